"""LoRA: adapters change the function only once trained; merged export and PEFT export match."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import VOCAB, build_hf_model, hf_config, hf_logits

from polmjax import models
from polmjax.models import lora as lora_lib
from polmjax.models.config import LoraConfig


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    build_hf_model("qwen3").save_pretrained(path)
    return path


def _trained(model, seed=1):
    """Adapters set to random values, as if trained (numpy draws: no random program to compile per shape)."""
    adapters, base = lora_lib.split(model.params())
    rng = np.random.RandomState(seed)
    adapters = jax.tree.map(lambda a: jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype), adapters)
    return models.Decoder(model.config, lora_lib.combine(adapters, base), hf_config=None)


def test_fresh_adapters_do_not_change_logits(base_dir):
    ids = np.random.RandomState(0).randint(3, VOCAB, (2, 10))
    base = models.from_pretrained(base_dir)
    adapted = models.from_pretrained(base_dir, lora=LoraConfig(rank=4, targets=("q", "v", "down")))
    assert "q_lora_a" in adapted.layers and adapted.layers["q_lora_a"][...].shape == (3, 64, 4)
    assert adapted.layers["q_lora_b"][...].shape == (3, 4, 4, 24)
    np.testing.assert_array_equal(np.asarray(adapted(ids)), np.asarray(base(ids)))


def test_merge_equals_adapted_and_exports_to_transformers(base_dir, tmp_path):
    ids = np.random.RandomState(1).randint(3, VOCAB, (2, 10))
    model = models.from_pretrained(base_dir, lora=LoraConfig(rank=4, alpha=8, targets=("q", "k", "v", "o", "gate", "up", "down")))
    model = _trained(model)
    model = models.Decoder(model.config, model.params(), hf_config=models.to_hf_config(model.config.replace(lora=None)))
    ours = np.asarray(model(ids))
    merged = lora_lib.merge(model)
    np.testing.assert_allclose(np.asarray(merged(ids)), ours, atol=1e-5, rtol=0)
    models.save_pretrained(model, tmp_path / "merged")  # merges on the way out
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(hf, ids), ours, atol=1e-4, rtol=0)


def test_peft_adapter_loads_in_peft(base_dir, tmp_path):
    import peft
    import transformers

    ids = np.random.RandomState(2).randint(3, VOCAB, (2, 10))
    model = _trained(models.from_pretrained(base_dir, lora=LoraConfig(rank=4, alpha=16,
                                                                      targets=("q_proj", "o_proj", "up_proj"))))
    lora_lib.save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base_dir))
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = peft_model(input_ids=torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), ref, atol=1e-4, rtol=0)


def test_seqcls_head_trains_with_the_adapters_and_saves_in_peft(tmp_path):
    """A sequence classifier's score head is trainable next to the adapters (PEFT's SEQ_CLS modules_to_save)
    and the PEFT adapter carries it: PEFT on the base classifier scores as polmjax does."""
    import peft
    import transformers

    torch.manual_seed(0)
    hf = transformers.AutoModelForSequenceClassification.from_config(hf_config("qwen3", num_labels=1),
                                                                     attn_implementation="eager")
    hf.save_pretrained(tmp_path / "base")
    model = models.from_pretrained(tmp_path / "base", lora=LoraConfig(rank=4, targets=("q", "up")))
    trainable, base = lora_lib.split(model.params())
    assert set(trainable) == {"layers", "score"} and "score" not in base and "q" in base["layers"]
    model = _trained(model)  # the head moves too
    lora_lib.save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = np.random.RandomState(4).randint(3, VOCAB, (2, 10))  # no pad id: HF pools the last token
    with torch.no_grad():
        ref = peft_model(input_ids=torch.as_tensor(ids)).logits.numpy()[:, 0]
    np.testing.assert_allclose(np.asarray(model(ids))[:, -1, 0], ref, atol=1e-4, rtol=0)


def test_bf16_base_keeps_fp32_adapters(base_dir):
    model = models.from_pretrained(base_dir, dtype=jnp.bfloat16, lora=LoraConfig(rank=2))
    adapters, base = lora_lib.split(model.params())
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(adapters))
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(base))


def test_dropout_is_random_only_with_rng(base_dir):
    model = _trained(models.from_pretrained(base_dir, lora=LoraConfig(rank=4, dropout=0.5)))
    ids = jnp.asarray(np.random.RandomState(3).randint(3, VOCAB, (1, 6)))
    p = model.params()
    run = lambda rng: models.forward_hidden(model.config, p, ids, dropout_rng=rng)[0]  # noqa: E731
    # model.hidden_states is compiled (fusion may round differently from the eager run): no dropout there either
    np.testing.assert_allclose(np.asarray(run(None)), np.asarray(model.hidden_states(ids)[0]), atol=1e-5, rtol=0)
    a, b = run(jax.random.key(0)), run(jax.random.key(1))
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_bad_targets_named():
    with pytest.raises(models.ConfigError, match="lora targets \\['attn'\\]"):
        LoraConfig(targets=("attn",))
