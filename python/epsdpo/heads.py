"""Reading a Hugging Face causal LM as a backbone followed by a linear head.

The fused kernel (epsdpo.ops) projects hidden states through the head itself, so it needs the head's
weight, bias and whatever the model family does to logits afterwards: Cohere's `logit_scale`,
Granite's `logits_scaling`, Gemma-2's `final_logit_softcapping`. That model-family knowledge lives
here, apart from the kernel's arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn



@dataclass(frozen=True)
class LMHeadSpec:
    """A causal LM seen as `backbone(...).last_hidden_state` followed by a linear head."""

    backbone: nn.Module
    weight: Tensor
    bias: Tensor | None
    logit_scale: float
    softcap: float | None


# Config attributes that rescale logits in ways `split_causal_lm` does not model; a model that sets
# any of them is left to the full-logits fallback rather than scored wrongly.
_UNMODELLED_LOGIT_ATTRS = ("output_multiplier", "lm_head_multiplier", "softcap")


def split_causal_lm(model: nn.Module) -> LMHeadSpec | None:
    """Split a Hugging Face causal LM into (backbone, head weight, bias, logit_scale, softcap).

    Returns None when the model cannot be split faithfully: no separate base model, an output
    embedding that is not an `nn.Linear`, or a logit transform this module does not model. Callers
    then compute full logits with `model(...).logits` and use `perturbed_logps_from_logits`; that
    fallback is exact but materialises [N, V] logits. Split again after wrapping a model (PEFT, FSDP),
    since wrappers replace the modules this captures.
    """
    if callable(getattr(model, "get_base_model", None)):
        # PEFT: the wrapped transformers model, with its adapter layers in place
        model = model.get_base_model()
    backbone = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if backbone is None or backbone is model or not isinstance(head, nn.Linear):
        return None
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if any(getattr(config, name, None) is not None for name in _UNMODELLED_LOGIT_ATTRS):
        return None
    logit_scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere multiplies
        logit_scale = float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite divides
        if getattr(config, "model_type", "") == "hyperclovax":  # ...but HyperCLOVA X multiplies
            return None
        logit_scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return LMHeadSpec(backbone, head.weight, head.bias, logit_scale, float(softcap) if softcap else None)
