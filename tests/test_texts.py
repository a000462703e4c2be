"""Text sources and window sampling (moeify.texts). No network, no real cache."""

import json
import random

import numpy as np
import pytest
import torch

from moeify.data import texts
from moeify.errors import InputError

BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
         "sensesensibility")


@pytest.fixture(autouse=True)
def _private_home(tmp_path, monkeypatch):
    """Every test gets its own MOEIFY_HOME, so nothing reads or writes ~/.cache/moeify."""
    monkeypatch.setenv("MOEIFY_HOME", str(tmp_path / "home"))


@pytest.fixture
def fake_austen(tmp_path):
    folder = tmp_path / "home" / "data" / "austen"
    folder.mkdir(parents=True)
    for b in BOOKS:
        (folder / f"{b}.txt").write_text(f"{b} line one\n{b} line two\n" * 50)
    return folder


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A byte-level BPE tokenizer built in memory; it adds <bos> by default, so
    tests can see that moeify tokenizes without special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([f"{b} line one\n{b} line two\n" for b in BOOKS] * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   model_max_length=16)


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("seed", [0, 1, 1234])
def test_sample_windows_match_gptq_global_random_sequence(seed):
    n_tokens, n, seq_len = 5000, 8, 64
    ids = torch.arange(n_tokens)
    random.seed(seed)
    expected = [random.randint(0, n_tokens - seq_len - 1) for _ in range(n)]

    random.seed(999)
    state = random.getstate()
    windows = texts.sample_windows(ids, n, seq_len, seed)

    assert random.getstate() == state, "sample_windows must not touch the global random state"
    assert windows.shape == (n, seq_len) and windows.dtype == torch.long
    assert windows[:, 0].tolist() == expected
    for row, start in zip(windows, expected):
        assert torch.equal(row, torch.arange(start, start + seq_len))


def test_sample_windows_too_short_names_counts():
    with pytest.raises(InputError, match=r"has 64 tokens.*need at least 65"):
        texts.sample_windows(torch.arange(64), 2, 64)
    # exactly seq_len + 1 tokens: randint(0, 0), the only valid start is 0
    w = texts.sample_windows(torch.arange(65), 3, 64)
    assert w[:, 0].tolist() == [0, 0, 0]


def test_sample_windows_rejects_bad_arguments():
    with pytest.raises(InputError):
        texts.sample_windows(torch.arange(100).reshape(10, 10), 1, 4)
    with pytest.raises(InputError):
        texts.sample_windows(torch.arange(100), 0, 4)


def test_heldout_windows_count_and_remainder_drop():
    ids = torch.arange(10)
    w = texts.heldout_windows(ids, seq_len=3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # token 9 dropped
    assert texts.heldout_windows(ids, seq_len=3, max_windows=2).shape == (2, 3)
    assert texts.heldout_windows(ids, seq_len=5).shape == (2, 5)
    with pytest.raises(InputError, match="10 tokens"):
        texts.heldout_windows(ids, seq_len=11)


# --------------------------------------------------------------------------- sources


def test_missing_file_error_says_what_to_do(tmp_path):
    with pytest.raises(InputError, match="no such file") as info:
        texts.load_text(str(tmp_path / "nope.txt"))
    assert "austen" in str(info.value)  # lists the sources one can use
    assert isinstance(info.value, ValueError)


def test_sources_joined_with_plus(tmp_path, fake_austen):
    """'A+B' is A's text then B's, for each split (austen's calibration novels, then its held-out ones); a file
    whose name has a '+' is still that file; a part that is no source is named in the error."""
    other = tmp_path / "other.txt"
    other.write_text("general text\n")
    for split in ("calibration", "heldout"):
        joined = texts.load_text(f"austen+{other}", split)
        assert joined == texts.load_text("austen", split) + "\n\n" + "general text\n"
    assert texts.load_text(f"austen+{other}") != texts.load_text(f"austen+{other}", "heldout")
    plus = tmp_path / "a+b.txt"
    plus.write_text("one file\n")
    assert texts.load_text(str(plus)) == "one file\n"
    with pytest.raises(InputError, match="'nonsense' is not a known name"):
        texts.load_text("austen+nonsense")


@pytest.mark.parametrize("content", [b"", b"  \n\n\t "])
def test_empty_file_is_an_error(tmp_path, content):
    p = tmp_path / "empty.txt"
    p.write_bytes(content)
    with pytest.raises(InputError, match="empty"):
        texts.load_text(str(p))


def test_binary_file_is_an_error(tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes(b"PK\x03\x04\x00\x00binary\x00stuff")
    with pytest.raises(InputError, match="binary"):
        texts.load_text(str(p))


def test_non_utf8_file_is_an_error(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        texts.load_text(str(p))


def test_text_file_read_verbatim(tmp_path):
    p = tmp_path / "a.md"
    p.write_text("# Title\n\nSome text \u00e9.\n", encoding="utf-8")
    assert texts.load_text(str(p)) == "# Title\n\nSome text \u00e9.\n"
    assert texts.load_text(str(p), "heldout") == texts.load_text(str(p))


def test_folder_source_sorted_txt_only(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "b.txt").write_text("second")
    (d / "a.txt").write_text("first")
    (d / "c.json").write_text('{"not": "read"}')
    assert texts.load_text(str(d)) == "first\n\nsecond"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no \\*.txt"):
        texts.load_text(str(empty))


def test_jsonl_default_and_named_field(tmp_path):
    p = tmp_path / "data.jsonl"
    rows = [{"text": "one", "body": "uno"}, {"text": "two", "body": "dos"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert texts.load_text(str(p)) == "one\n\ntwo"
    assert texts.load_text(f"{p}:body") == "uno\n\ndos"
    with pytest.raises(InputError, match="no field 'missing'"):
        texts.load_text(f"{p}:missing")


def test_jsonl_bad_line_and_chat_without_tokenizer(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2"):
        texts.load_text(str(bad))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(InputError, match="chat template"):
        texts.load_text(f"{chat}:messages")


def test_unknown_split_and_bad_hub_spec():
    with pytest.raises(InputError, match="split"):
        texts.load_text("austen", "train")
    with pytest.raises(InputError, match="hf:NAME"):
        texts.load_text("hf:only-a-name")


def test_austen_splits_follow_protocol(fake_austen):
    read = {b: (fake_austen / f"{b}.txt").read_text() for b in BOOKS}
    cal = texts.load_text("austen", "calibration")
    held = texts.load_text("austen", "heldout")
    assert cal == "\n\n".join(read[b] for b in
                              ("emma", "mansfieldpark", "prideprejudice", "sensesensibility"))
    assert held == read["persuasion"] + "\n\n" + read["northangerabbey"]


# --------------------------------------------------------------------------- tokens


def test_tokenize_has_no_special_tokens_and_no_length_warning(tiny_tokenizer, caplog):
    text = "emma line one\nemma line two\n" * 20  # far longer than model_max_length=16
    ids = texts.tokenize(tiny_tokenizer, text)
    assert "longer than the specified maximum" not in caplog.text
    expected = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.dtype == torch.long and ids.tolist() == expected
    assert ids[0].item() != tiny_tokenizer.bos_token_id


def test_token_ids_cached_as_npy(tmp_path, fake_austen, tiny_tokenizer, monkeypatch):
    first = texts.load_token_ids(tiny_tokenizer, "austen", "heldout")
    files = list((tmp_path / "home" / "cache" / "tokens").glob("*.npy"))
    assert len(files) == 1
    assert np.load(files[0], allow_pickle=False).tolist() == first.tolist()

    def boom(*a, **k):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(texts, "tokenize", boom)
    again = texts.load_token_ids(tiny_tokenizer, "austen", "heldout")
    assert again.dtype == torch.long and torch.equal(again, first)

    # a different text must not hit the old entry
    (fake_austen / "persuasion.txt").write_text("changed text\n" * 40)
    with pytest.raises(AssertionError, match="tokenized again"):
        texts.load_token_ids(tiny_tokenizer, "austen", "heldout")


def test_calibration_and_perplexity_windows(fake_austen, tiny_tokenizer):
    cal_ids = texts.load_token_ids(tiny_tokenizer, "austen", "calibration")
    w = texts.calibration_windows(tiny_tokenizer, "austen", n=4, seq_len=32, seed=3)
    assert torch.equal(w, texts.sample_windows(cal_ids, 4, 32, 3))

    held_ids = texts.load_token_ids(tiny_tokenizer, "austen", "heldout")
    quick = texts.perplexity_windows(tiny_tokenizer, "austen", quick=True, seq_len=8)
    full = texts.perplexity_windows(tiny_tokenizer, "austen", quick=False, seq_len=8)
    assert quick.shape == (16, 8)
    assert full.shape == (held_ids.numel() // 8, 8) and full.shape[0] > 16
    assert torch.equal(full[:16], quick)
    assert torch.equal(full.flatten(), held_ids[: full.numel()])


# --------------------------------------------------------------------------- checks before a model is loaded


@pytest.fixture
def hub_down(monkeypatch, tmp_path):
    monkeypatch.setattr(texts, "_HUB_STATUS", {"https://huggingface.co": "unreachable (test)"})
    for var in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hugging Face cache
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def test_check_text_source_names_the_input_for_every_problem(tmp_path, tiny_tokenizer):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "bin.txt").write_bytes(b"abc\x00def")
    (tmp_path / "short.txt").write_text("a few words")
    cases = [(tmp_path / "nope.txt", "no such file"), (tmp_path / "empty.txt", "is empty"), (tmp_path / "bin.txt", "binary")]
    for path, why in cases:
        with pytest.raises(InputError, match=rf"^--calib {path}: .*{why}"):
            texts.check_text_source(str(path), what="--calib")
    assert texts.check_text_source(str(tmp_path / "short.txt")) is None  # readable text: fine without a tokenizer
    n = texts.check_text_source(str(tmp_path / "short.txt"), tokenizer=tiny_tokenizer)
    assert n == texts.load_token_ids(tiny_tokenizer, str(tmp_path / "short.txt")).numel()
    with pytest.raises(InputError, match=rf"^--ppl {tmp_path / 'short.txt'}: .*has {n} tokens, fewer than the 2048 needed"):
        texts.check_text_source(str(tmp_path / "short.txt"), "heldout", tokenizer=tiny_tokenizer, min_tokens=2048, what="--ppl")


def test_unreadable_file_is_an_input_error(tmp_path, monkeypatch):
    f = tmp_path / "locked.txt"
    f.write_text("text")
    real = type(f).read_bytes

    def denied(self):
        if self == f:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(type(f), "read_bytes", denied)
    with pytest.raises(InputError, match="cannot read .*Permission denied"):
        texts.load_text(str(f))


def test_chat_jsonl_is_checked_without_a_tokenizer(tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert texts.check_text_source(f"{f}:messages") is None  # the rendering waits for the tokenizer
    with pytest.raises(InputError, match="chat template"):
        texts.load_text(f"{f}:messages")


def test_hub_sources_fail_in_seconds_when_the_hub_is_unreachable(hub_down):
    import time

    t0 = time.perf_counter()
    for source in ("wikitext2", "c4", "hf:some/data:train:text"):
        with pytest.raises(InputError, match=rf"--calib {source}: .*needs the Hugging Face hub, which is not reachable \(unreachable \(test\)\)"):
            texts.check_text_source(source, what="--calib")
    with pytest.raises(InputError, match="not reachable"):
        texts.load_text("wikitext2")  # the library path too: no minute of retries
    assert time.perf_counter() - t0 < 5  # no minute of retries


def test_hub_status_respects_offline_mode(monkeypatch):
    monkeypatch.setattr(texts, "_HUB_STATUS", {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert texts.hub_status() == "HF_HUB_OFFLINE is set"
