"""The Pallas GPU kernels compiled for and run on a real GPU, against the XLA references (skipped without one).

Everything else tests the kernels in interpret mode (CPU) and compiles them for GPU targets without running
them (test_gpu_aot.py). On a GPU machine:

    JAX_PLATFORMS=cuda pytest -q tests/test_kernels_on_gpu.py      # experiments/benchmarks/gpu_check.sh does

References run in float32 at HIGHEST matmul precision; the kernels use 3xTF32 for float32 inputs and bf16
tensor cores for bf16 inputs, hence the tolerances.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polmjax.kernels.attention.ops import attention
from polmjax.kernels.logprobs import token_logprobs_reference
from polmjax.kernels.logprobs.ops import token_logprobs

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (run with JAX_PLATFORMS=cuda)")

# max |error| relative to max |reference| (inputs are O(1); gradients of the model test are not)
TOLERANCE = {jnp.dtype(jnp.float32): 1e-4, jnp.dtype(jnp.bfloat16): 3e-2}


def _close(name, got, want, dtype, floor=1.0):
    """max |got - want| <= tolerance * max(max |want|, floor)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    bound = TOLERANCE[jnp.dtype(dtype)] * max(float(np.max(np.abs(want))) if want.size else 0.0, floor)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def _segments(B, T, seed):
    cuts = np.sort(np.random.default_rng(seed).integers(0, T, size=(B, 3)), axis=1)
    return jnp.asarray(np.stack([np.searchsorted(c, np.arange(T), side="right") for c in cuts]), jnp.int32)


ATTENTION_CASES = {
    "causal": dict(),
    "segments": dict(segments=True),
    "window_softcap": dict(window=200, softcap=30.0),
    "non_causal_scale": dict(causal=False, scale=0.1),
    "decode": dict(T=1, q_offset=777),
}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_flash_attention_on_gpu(case, head_dim, dtype):
    """Output and dq, dk, dv of pallas_gpu vs the XLA reference: odd length 1000, GQA 8:2, B=2."""
    opts = dict(ATTENTION_CASES[case])
    B, S, H, G = 2, 1000, 8, 2
    T = opts.pop("T", S)
    segments = _segments(B, S, 0) if opts.pop("segments", False) else None
    if "q_offset" in opts:
        opts["q_offset"] = jnp.int32(opts["q_offset"])  # traced, as in KV-cache decoding
    keys = jax.random.split(jax.random.key(head_dim), 4)
    q = jax.random.normal(keys[0], (B, T, H, head_dim), dtype)
    k = jax.random.normal(keys[1], (B, S, G, head_dim), dtype)
    v = jax.random.normal(keys[2], (B, S, G, head_dim), dtype)
    dout = jax.random.normal(keys[3], (B, T, H, head_dim), dtype)

    def run(impl, q, k, v):
        fn = lambda q, k, v: attention(q, k, v, segment_ids=segments, impl=impl, **opts)  # noqa: E731
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(dout.astype(out.dtype)))

    got = jax.jit(functools.partial(run, "pallas_gpu"))(q, k, v)
    with jax.default_matmul_precision("highest"):
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        want = jax.jit(functools.partial(run, "xla"))(*f32)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype
        _close(f"{case} K={head_dim} {name}", g, w, dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("N,D,V,options", [
    (1000, 576, 50257, dict()),
    (1000, 576, 50257, dict(temperature=0.7, softcap=30.0, return_entropy=True)),
    (4096, 2048, 131072, dict(return_entropy=True)),
])
def test_token_logprobs_on_gpu(N, D, V, options, dtype):
    """lp (and entropy) and their gradients to hidden and unembed: pallas_gpu vs the chunked reference."""
    keys = jax.random.split(jax.random.key(N + V), 5)
    h = jax.random.normal(keys[0], (N, D), dtype)
    w = (jax.random.normal(keys[1], (D, V), jnp.float32) * D**-0.5).astype(dtype)
    t = jax.random.randint(keys[2], (N,), 0, V)
    g_lp = jax.random.normal(keys[3], (N,), jnp.float32)
    g_ent = jax.random.normal(keys[4], (N,), jnp.float32)

    def run(fn, h, w):
        out, vjp = jax.vjp(lambda h, w: fn(h, w, t, **options), h, w)
        cot = (g_lp, g_ent) if options.get("return_entropy") else g_lp
        return (out, *vjp(cot))

    got = jax.jit(functools.partial(run, functools.partial(token_logprobs, impl="pallas_gpu")))(h, w)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(functools.partial(run, token_logprobs_reference))(h.astype(jnp.float32), w.astype(jnp.float32))
    got_out, want_out = got[0], want[0]
    if not options.get("return_entropy"):
        got_out, want_out = (got_out,), (want_out,)
    for name, g, r in zip(("lp", "entropy"), got_out, want_out):
        _close(f"{name} N={N} V={V}", g, r, dtype)
    _close("d_hidden", got[1], want[1], dtype)
    _close("d_unembed", got[2], want[2], dtype)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_model_sft_loss_and_grads_on_gpu(compute_dtype):
    """A Gemma-2-style model (local/global layers, soft-caps, GQA, packed segments) trained with both Pallas
    GPU kernels gives the loss and gradients of the XLA paths."""
    from polmjax import models
    from polmjax.train.sft import micro_batch_loss

    base = dict(family="gemma2", vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=64, layer_types=("sliding", "full"), sliding_window=64,
                gemma_norm=True, post_norms=True, embed_scale=True, attn_softcap=50.0, final_softcap=30.0,
                compute_dtype=compute_dtype)
    ref_cfg = models.ModelConfig(**base, attention_impl="xla", logprob_impl="xla")
    cfg = models.ModelConfig(**base, attention_impl="pallas_gpu", logprob_impl="pallas_gpu")
    params = models.init_params(ref_cfg, jax.random.key(0))
    rs = np.random.RandomState(0)
    B, T = 2, 300
    ids = rs.randint(0, 4096, (B, T))
    segment_ids = np.repeat(np.array([[1] * 200 + [2] * 100]), B, axis=0).astype(np.int32)
    positions = np.concatenate([np.arange(200), np.arange(100)])[None].repeat(B, 0).astype(np.int32)
    batch = {"input_ids": ids, "positions": positions, "segment_ids": segment_ids,
             "targets": np.roll(ids, -1, axis=1), "weights": np.full((B, T), 1 / (B * T), np.float32)}
    got = jax.jit(jax.value_and_grad(lambda p: micro_batch_loss(cfg, p, batch)))(params)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(jax.value_and_grad(lambda p: micro_batch_loss(ref_cfg, p, batch)))(params)
    dtype = jnp.float32 if compute_dtype == "float32" else jnp.bfloat16
    _close("loss", got[0], want[0], dtype)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got[1]), jax.tree.leaves(want[1])):
        _close(f"grad {jax.tree_util.keystr(path)}", g, w, dtype, floor=1e-6)  # gradients are << 1


@pytest.mark.parametrize("segments", [False, True], ids=["causal", "causal_segments"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cudnn_attention_on_gpu(head_dim, segments):
    """impl="cudnn" (segment ids as a dense mask) vs the XLA reference, output and gradients, bf16."""
    B, T, H, G = 2, 512, 8, 2
    keys = jax.random.split(jax.random.key(head_dim), 4)
    q = jax.random.normal(keys[0], (B, T, H, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, T, G, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, T, G, head_dim), jnp.bfloat16)
    dout = jax.random.normal(keys[3], (B, T, H, head_dim), jnp.bfloat16)
    seg = _segments(B, T, 1) if segments else None

    def run(impl, q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, segment_ids=seg, impl=impl), q, k, v)
        return (out, *vjp(dout.astype(out.dtype)))

    got = jax.jit(functools.partial(run, "cudnn"))(q, k, v)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(functools.partial(run, "xla"))(*(x.astype(jnp.float32) for x in (q, k, v)))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        _close(f"cudnn K={head_dim} {name}", g, w, jnp.bfloat16)
