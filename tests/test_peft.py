"""PEFT policies: the default reference is the policy's base model with adapters switched off."""

from __future__ import annotations

import copy

import pytest
import torch

from epsdpo.models import AdapterFreeReference
from epsdpo.scoring import batch_logps
from epsdpo.trainer import Trainer
from test_trainer import config
from tiny import tiny_llama, toy_store

peft = pytest.importorskip("peft")


def lora_policy(seed=0, head=False):
    base = tiny_llama(seed)
    targets = ["q_proj", "v_proj"] + (["lm_head"] if head else [])
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    return model


def perturb_adapters(model, seed=1):
    """LoRA starts as a no-op (B = 0); give it weights so adapters-on and -off differ."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)


def batch(layout="packed"):
    from epsdpo import Collator, Truncation

    store = toy_store(6, seed=2)
    return Collator(layout, truncation=Truncation(max_length=32))(store, list(range(len(store))))


@pytest.mark.parametrize("head", [False, True], ids=["split_head", "adapted_head_full_logits"])
def test_adapter_free_reference_scores_the_base_model(head):
    policy = lora_policy(head=head)
    base_copy = copy.deepcopy(policy.get_base_model())
    perturb_adapters(policy)
    got = batch_logps(policy, AdapterFreeReference(policy), batch(), 0.1)
    # The base model alone: strip the adapters from a copy taken before they got weights
    plain = copy.deepcopy(base_copy)
    for module in plain.modules():
        for attr in ("lora_A", "lora_B"):
            if hasattr(module, attr):
                getattr(module, attr).clear()
    want = batch_logps(plain, None, batch(), 0.0).policy
    torch.testing.assert_close(got.reference, want.detach(), rtol=1e-5, atol=1e-5)
    # ...while the policy itself runs with its adapters on
    assert (got.policy - got.reference).abs().max() > 1e-3


def test_trainer_uses_the_adapter_free_reference_without_copying(tmp_path):
    policy = lora_policy()
    trainer = Trainer(policy, config(tmp_path, max_steps=6, learning_rate=1e-2), toy_store())
    assert isinstance(trainer.ref_model, AdapterFreeReference) and trainer.ref_model.policy is policy
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n for n in trained)
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    before = batch_logps(policy, trainer.ref_model, batch(), 0.1)
    trainer.train()
    after = batch_logps(policy, trainer.ref_model, batch(), 0.1)
    # Base weights never move, so the reference log-probs are those of the initial policy...
    for name, p in policy.named_parameters():
        if name in frozen:
            torch.testing.assert_close(p, frozen[name], rtol=0, atol=0)
    torch.testing.assert_close(after.reference, before.reference)
    # ...which LoRA's zero-initialised B makes the starting policy exactly
    torch.testing.assert_close(before.policy.detach(), before.reference)
    assert (after.policy - after.reference).abs().max() > 1e-4


def test_tr_dpo_needs_a_reference_of_its_own(tmp_path):
    with pytest.raises(ValueError, match="tr_dpo"):
        Trainer(lora_policy(), config(tmp_path, method="tr_dpo"), toy_store())


def test_adapter_free_reference_runs_without_dropout():
    """The reference must be deterministic even while the policy trains with dropout on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.5,
                                        attn_implementation="eager"))
    policy = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5))
    policy.train()
    reference = AdapterFreeReference(policy)
    first = batch_logps(policy, reference, batch("padded"), 0.0).reference
    second = batch_logps(policy, reference, batch("padded"), 0.0).reference
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert policy.training  # and the policy is left as it was


def test_use_peft_builds_lora_from_trls_fields(tmp_path):
    from epsdpo.config import TrainConfig
    from epsdpo.models import AdapterFreeReference
    from epsdpo.trainer import Trainer
    from tiny import tiny_llama, toy_store

    config = TrainConfig(output_dir=str(tmp_path / "run"), use_peft=True, lora_r=4, lora_alpha=8,
                         lora_target_modules=["q_proj", "v_proj"], learning_rate=1e-3, max_steps=1,
                         per_device_train_batch_size=4, max_length=32, max_prompt_length=16, progress=False,
                         plots=False, report_to="none")
    trainer = Trainer(tiny_llama(0), config, toy_store(16))
    assert isinstance(trainer.ref_model, AdapterFreeReference)
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trained)
    assert trainer.model.peft_config["default"].r == 4
    trainer.train()


def test_model_init_kwargs_reach_from_pretrained(tmp_path):
    from epsdpo.config import TrainConfig
    from epsdpo.models import load_causal_lm
    from tiny import tiny_llama

    tiny_llama(0).save_pretrained(tmp_path / "m")
    config = TrainConfig(model_init_kwargs='{"attn_implementation": "eager"}')
    assert config.model_init_kwargs == {"attn_implementation": "eager"}
    model = load_causal_lm(tmp_path / "m", init_kwargs=config.model_init_kwargs)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="model_init_kwargs may not set dtype"):
        load_causal_lm(tmp_path / "m", init_kwargs={"dtype": "bfloat16"})
    with pytest.raises(ValueError, match="model_init_kwargs='not json' is invalid: must be a JSON object"):
        TrainConfig(model_init_kwargs="not json")
