"""The model with each Pallas backend (interpret mode on CPU) equals the XLA reference; SFT loss+grad too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import build_hf_model

from polmjax import mesh as mesh_lib
from polmjax import models
from polmjax.train.sft import micro_batch_loss


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory):
    # Gemma 2 exercises windows, soft-caps (attention and final) and GQA in one model
    path = tmp_path_factory.mktemp("gemma2")
    build_hf_model("gemma2", num_hidden_layers=2).save_pretrained(path)
    return path


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_logits_and_sft_grads_per_backend(gemma2_dir, impl):
    ids = np.random.RandomState(0).randint(3, 97, (2, 12))
    ref = models.from_pretrained(gemma2_dir, attention_impl="xla", logprob_impl="xla")
    fast = models.from_pretrained(gemma2_dir, attention_impl=impl, logprob_impl=impl, kernel_interpret=True)
    np.testing.assert_allclose(np.asarray(fast(ids)), np.asarray(ref(ids)), atol=2e-5, rtol=0)

    batch = {"input_ids": ids, "positions": np.broadcast_to(np.arange(12), (2, 12)),
             "segment_ids": np.ones((2, 12), np.int32), "targets": np.roll(ids, -1, axis=1),
             "weights": np.full((2, 12), 1 / 24, np.float32)}
    loss = lambda m, p: micro_batch_loss(m.config, p, batch)  # noqa: E731
    ref_l, ref_g = jax.jit(jax.value_and_grad(lambda p: loss(ref, p)))(ref.params())
    got_l, got_g = jax.jit(jax.value_and_grad(lambda p: loss(fast, p)))(fast.params())
    np.testing.assert_allclose(float(got_l), float(ref_l), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_sharded_model_with_pallas_equals_reference(gemma2_dir):
    ids = np.random.RandomState(1).randint(3, 97, (4, 8))
    ref = np.asarray(models.from_pretrained(gemma2_dir, attention_impl="xla")(ids))
    mesh = mesh_lib.make_mesh(2, 2, 2)
    model = models.from_pretrained(gemma2_dir, mesh=mesh, attention_impl="pallas_tpu", kernel_interpret=True)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, x: m(x))(model, ids)), ref, atol=2e-5, rtol=0)


def test_naive_vs_fused_sft_loss_grad_fp32():
    cfg = models.ModelConfig(family="llama", vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1,
                             num_heads=2, num_kv_heads=1, head_dim=16)
    params = models.init_params(cfg, jax.random.key(0))
    ids = np.random.RandomState(2).randint(0, 300, (2, 10))
    targets = np.roll(ids, -1, 1)

    def fused(p):
        h, _ = models.forward_hidden(cfg, p, ids)
        return models.target_logprobs(cfg, p, h, targets).sum()

    def naive(p):
        logits = models.logits_from_hidden(cfg, p, models.forward_hidden(cfg, p, ids)[0])
        return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).sum()

    (a, ga), (b, gb) = jax.jit(jax.value_and_grad(fused))(params), jax.jit(jax.value_and_grad(naive))(params)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)
