"""The pretrained model behind a DuDe adapter: disable_adapter(), unload(), delete_adapter(),
a second adapter, tied weights, and the train/eval mode get_dude_model hands back."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
from trl import SFTConfig

from conftest import make_llama, make_qwen2, make_tokenizer, perturb_trainable_
from dude_trl import DuDeConfig, DuDeSFTTrainer, get_dude_model
from dude_trl.config import METHODS
from dude_trl.layers import residual_owner
from dude_trl.model import initialize_dude_

IDS = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
ATOL = 1e-5  # float32 logits of the tiny models are O(0.1-1)
SVD_METHODS = ["dude", "dude_a", "dude_b", "pissa"]


def _config(method: str, **kw) -> DuDeConfig:
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    return DuDeConfig(r=4, lora_alpha=8, method=method, **kw)


def _trained(method: str, make=make_qwen2):
    """(pretrained model, a DuDe model of it whose A, B, m moved as training would)."""
    base = make()
    return base, perturb_trainable_(get_dude_model(copy.deepcopy(base), _config(method), progress=False))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _assert_pretrained(base, model) -> None:
    torch.testing.assert_close(_logits(model), _logits(base), atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_disable_adapter_gives_the_pretrained_model(method):
    base, model = _trained(method)
    trained = _logits(model)
    assert (trained - _logits(base)).abs().max() > 1e-2  # the adapter does change the model
    with model.disable_adapter():
        _assert_pretrained(base, model)
    torch.testing.assert_close(_logits(model), trained, atol=0, rtol=0)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_disable_adapter_on_merged_weights_gives_the_pretrained_model(method):
    base, model = _trained(method)
    model.merge_adapter()
    with model.disable_adapter():  # PEFT unmerges first
        _assert_pretrained(base, model)


@pytest.mark.parametrize("method", METHODS)
def test_unload_returns_the_pretrained_weights(method):
    base, model = _trained(method)
    unloaded = model.unload()
    _assert_pretrained(base, unloaded)
    for name, weight in base.state_dict().items():
        torch.testing.assert_close(unloaded.state_dict()[name], weight, atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_unload_still_merges_the_adapter(method):
    _, model = _trained(method)
    trained = _logits(model)
    torch.testing.assert_close(_logits(copy.deepcopy(model).merge_and_unload()), trained, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_delete_adapter_restores_the_pretrained_weights(method):
    base, model = _trained(method)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))  # B = 0: a no-op
    model.delete_adapter("default")
    assert model.active_adapters == ["other"]
    _assert_pretrained(base, model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert residual_owner(layer) is None
    torch.testing.assert_close(layer.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight, atol=ATOL, rtol=0)


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_a_copy_keeps_its_own_pretrained_view(copier):
    """TRL copies PEFT models for reference models: the copy's hooks must use the copy's tensors."""
    base, model = _trained("dude")
    clone = copier(model)
    layer = clone.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.delete_adapter.args[0] is layer and layer.unload_and_optionally_merge_module.args[0] is layer
    with clone.disable_adapter():
        _assert_pretrained(base, clone)
    _assert_pretrained(base, clone.unload())


def test_reference_logprobs_under_disable_adapter_during_training(tmp_path):
    """The pattern of DPO/KL pipelines: reference log-probs with the adapter disabled, mid-training."""
    tokenizer = make_tokenizer()
    base = make_qwen2()
    expected = torch.log_softmax(_logits(base), dim=-1)
    reference, adapted = [], []

    def distance(model) -> float:
        with torch.no_grad():
            return (torch.log_softmax(model(IDS).logits, dim=-1) - expected).abs().max().item()

    class ReferenceLogprobs(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            with model.disable_adapter():
                reference.append(distance(model))
            adapted.append(distance(model))

    data = Dataset.from_dict({"text": ["Q: 1+1? A: 2", "Q: 2+3? A: 5"] * 4})
    trainer = DuDeSFTTrainer(
        model=copy.deepcopy(base),
        args=SFTConfig(
            output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=5e-2,
            report_to=[], use_cpu=True, bf16=False, save_strategy="no", logging_steps=1, max_length=32,
        ),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=_config("dude"),
        callbacks=[ReferenceLogprobs()],
    )
    trainer.train()
    assert len(reference) == 3 and max(reference) <= ATOL
    assert min(adapted) > 1e-3  # training moved the adapted model away from the reference


def _add_adapter(model, name: str, config) -> None:
    model.add_adapter(name, config)
    if isinstance(config, DuDeConfig):
        initialize_dude_(model, name, progress=False)


def test_a_second_lora_adapter_computes_on_the_pretrained_weight():
    base, model = _trained("dude")
    dude_only = _logits(model)
    _add_adapter(model, "other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    lora_weights = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and ".other." in name:
                param.copy_(0.1 * torch.randn_like(param))
                lora_weights[name.replace(".other.", ".default.").removeprefix("base_model.model.")] = param.clone()
    model.set_adapter("other")
    plain = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    loaded = plain.base_model.model.load_state_dict(lora_weights, strict=False)
    assert not loaded.unexpected_keys and len(lora_weights) == 8  # A and B of q and v in 2 layers
    torch.testing.assert_close(_logits(model), _logits(plain), atol=ATOL, rtol=0)
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model), dude_only, atol=ATOL, rtol=0)


@pytest.mark.parametrize("second", ["dude", "pissa", "dora"])
def test_a_second_svd_or_magnitude_adapter_on_a_residual_layer_is_refused(second):
    _, model = _trained("dude")
    before = _logits(model)
    with pytest.raises(ValueError, match="already holds the DuDe residual of adapter 'default'.*method='lora'"):
        _add_adapter(model, "second", _config(second))
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model), before, atol=0, rtol=0)


def test_an_svd_adapter_next_to_a_dora_adapter_is_refused():
    _, model = _trained("dora")
    with pytest.raises(ValueError, match="holds the magnitude adapter 'default'"):
        _add_adapter(model, "second", _config("dude"))


def test_a_plain_peft_dora_adapter_next_to_a_residual_is_refused_at_forward():
    _, model = _trained("dude")
    model.add_adapter("dora", LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True))
    model.set_adapter("dora")
    with pytest.raises(ValueError, match="normalises its update by the layer's base weight"):
        _logits(model)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_get_dude_model_keeps_the_mode_the_model_came_in(training):
    model = get_dude_model(make_llama().train(training), _config("dude"), progress=False)
    assert {m.training for m in model.modules()} == {training}


@pytest.mark.parametrize("is_trainable", [False, True])
def test_a_reloaded_adapter_is_in_eval_mode_unless_trainable(tmp_path, is_trainable):
    """As PEFT's from_pretrained: a frozen reload is in eval mode (no dropout); a trainable one keeps the base's."""
    get_dude_model(make_llama(), _config("dude"), progress=False).save_pretrained(tmp_path)
    model = get_dude_model(make_llama().train(), str(tmp_path), is_trainable=is_trainable, progress=False)
    assert {m.training for m in model.modules()} == {is_trainable}



def _tied_llama() -> LlamaForCausalLM:
    """A tiny Llama whose lm_head shares the embedding matrix, as SmolLM2's and Qwen2.5-0.5B's do."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("method", ["dude", "pissa"])
def test_a_tied_svd_target_is_untied_and_said_so(method, caplog, tmp_path):
    base = _tied_llama()
    config = _config(method, target_modules=["q_proj", "lm_head"])
    with caplog.at_level(logging.WARNING, logger="dude_trl.layers"):
        model = get_dude_model(copy.deepcopy(base), config, progress=False)
    assert "Untied base_model.model.lm_head from base_model.model.model.embed_tokens.weight" in caplog.text
    inner = model.get_base_model()
    torch.testing.assert_close(inner.model.embed_tokens.weight, base.model.embed_tokens.weight, atol=0, rtol=0)
    assert inner.config.tie_word_embeddings is False
    _assert_pretrained(base, model)  # the output at init is the pretrained one
    perturb_trainable_(model).save_pretrained(tmp_path)
    reloaded = get_dude_model(copy.deepcopy(base), str(tmp_path), progress=False)
    torch.testing.assert_close(_logits(reloaded), _logits(model), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        reloaded.get_base_model().model.embed_tokens.weight, base.model.embed_tokens.weight, atol=0, rtol=0
    )


def test_a_tied_target_of_plain_lora_stays_tied():
    """LoRA leaves the base weight as it is, so there is nothing to untie (PEFT's own behaviour)."""
    model = get_dude_model(_tied_llama(), _config("lora", target_modules=["lm_head"]), progress=False)
    inner = model.get_base_model()
    assert inner.lm_head.base_layer.weight is inner.model.embed_tokens.weight


def test_a_reloaded_adapter_gives_the_pretrained_model_when_disabled(tmp_path):
    base, model = _trained("dude")
    model.save_pretrained(tmp_path)
    reloaded = get_dude_model(copy.deepcopy(base), str(tmp_path), progress=False)
    torch.testing.assert_close(_logits(reloaded), _logits(model), atol=ATOL, rtol=0)
    with reloaded.disable_adapter():
        _assert_pretrained(base, reloaded)


def test_mixed_adapter_batches_on_a_residual_layer_are_refused():
    """PEFT's adapter_names= would run the "__base__" rows on the residual: refused, not silently wrong."""
    _, model = _trained("pissa")
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        with torch.no_grad():
            model(IDS, adapter_names=["default", "__base__"])
