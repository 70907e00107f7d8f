"""token_logprobs: chunked reference vs naive log_softmax, Pallas kernels (interpret mode) vs reference,
sharded == single device, no [N, V] intermediate, argument validation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AxisType

from polmjax.kernels import token_logprobs
from polmjax.kernels.logprobs import (
    BlockSizes,
    gpu,
    token_logprobs_naive,
    token_logprobs_reference,
    token_logprobs_sharded,
)
from polmjax.mesh import make_mesh

# The smallest legal tiles, so that tiny problems still span several blocks and ragged edges.
TPU_BLOCKS = BlockSizes(block_n=16, block_v=128, block_n_dh=16, block_v_dh=128, block_n_dw=16, block_v_dw=128)
# chunk_v=96: V up to 300 runs the backward's chunk loop and a ragged tail chunk.
GPU_BLOCKS = BlockSizes(block_n=16, block_v=64, block_n_dz=16, block_v_dz=32, block_d=16, chunk_v=96)
BLOCKS = {"xla": BlockSizes(block_v=64), "pallas_tpu": TPU_BLOCKS, "pallas_gpu": GPU_BLOCKS}


def _problem(N, D, V, dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    h = jax.random.normal(k[0], (N, D), jnp.float32).astype(dtype)
    w = (jax.random.normal(k[1], (D, V), jnp.float32) * 0.5).astype(dtype)
    t = jax.random.randint(k[2], (N,), 0, V)
    g_lp = jax.random.normal(k[3], (N,), jnp.float32)
    g_ent = jax.random.normal(k[4], (N,), jnp.float32)
    return h, w, t, g_lp, g_ent


def _value_and_grads(fn, h, w, t, g_lp, g_ent, *, return_entropy, **kw):
    """(lp, entropy or None, dh, dw) of sum(g_lp * lp) + sum(g_ent * entropy)."""

    def loss(h, w):
        out = fn(h, w, t, return_entropy=return_entropy, **kw)
        lp, ent = out if return_entropy else (out, None)
        total = jnp.sum(g_lp * lp) + (jnp.sum(g_ent * ent) if return_entropy else 0.0)
        return total, (lp, ent)

    (_, (lp, ent)), (dh, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h, w)
    return lp, ent, dh, dw


def _assert_close(got, want, dtype, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if jnp.dtype(dtype) == jnp.float32:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=what)
    else:  # bf16 operands and bf16 gradients: compare at the scale of the result
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * scale, err_msg=what)


def _compare(got, want, dtype):
    for name, g, r in zip(("lp", "entropy", "d_hidden", "d_unembed"), got, want):
        if r is not None:
            assert g.dtype == r.dtype, name
            _assert_close(g, r, dtype, name)


# ----------------------------------------------------------------------------- reference vs naive


@pytest.mark.parametrize("temperature,softcap,return_entropy,chunk_v", [
    (1.0, None, False, 64),   # ragged last chunk (203 = 3 * 64 + 11)
    (1.0, None, True, 203),   # one exact chunk
    (0.7, None, True, 1000),  # chunk larger than V
    (1.0, 3.0, True, 64),
    (1.3, 5.0, True, 50),
    (1.3, 5.0, False, 128),
])
def test_reference_matches_naive_fp32(temperature, softcap, return_entropy, chunk_v):
    h, w, t, g_lp, g_ent = _problem(19, 16, 203)
    kw = dict(temperature=temperature, softcap=softcap, return_entropy=return_entropy)
    got = _value_and_grads(functools.partial(token_logprobs_reference, chunk_v=chunk_v), h, w, t, g_lp, g_ent, **kw)
    want = _value_and_grads(token_logprobs_naive, h, w, t, g_lp, g_ent, **kw)
    _compare(got, want, jnp.float32)


def test_reference_matches_naive_bf16():
    h, w, t, g_lp, g_ent = _problem(24, 32, 300, jnp.bfloat16)
    kw = dict(temperature=0.9, softcap=20.0, return_entropy=True)
    got = _value_and_grads(functools.partial(token_logprobs_reference, chunk_v=128), h, w, t, g_lp, g_ent, **kw)
    want = _value_and_grads(token_logprobs_naive, h, w, t, g_lp, g_ent, **kw)
    _compare(got, want, jnp.bfloat16)


def test_uniform_distribution_hand_values():
    """unembed = 0: every logit is 0, so lp = -log V and entropy = log V; d_hidden = 0."""
    N, D, V = 5, 8, 77
    h = jnp.ones((N, D))
    lp, ent = token_logprobs(h, jnp.zeros((D, V)), jnp.arange(N), return_entropy=True)
    np.testing.assert_allclose(lp, -np.log(V) * np.ones(N), rtol=1e-6)
    np.testing.assert_allclose(ent, np.log(V) * np.ones(N), rtol=1e-6)
    dh = jax.grad(lambda h: token_logprobs(h, jnp.zeros((D, V)), jnp.arange(N)).sum())(h)
    np.testing.assert_allclose(dh, 0.0, atol=1e-7)


def test_probabilities_sum_to_one():
    """exp(lp) over every possible target of one token sums to 1, and -sum p lp is the entropy."""
    D, V = 16, 150
    h, w, _, _, _ = _problem(1, D, V, seed=3)
    lp, ent = token_logprobs(jnp.repeat(h, V, axis=0), w, jnp.arange(V), softcap=4.0, temperature=0.8,
                             return_entropy=True, block_sizes=BlockSizes(block_v=64))
    np.testing.assert_allclose(float(jnp.exp(lp).sum()), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(-(jnp.exp(lp) * lp).sum()), float(ent[0]), rtol=1e-5)


def test_peaked_distribution_entropy_is_accurate():
    """Large logit gaps: the entropy accumulator is kept relative to the running max (no cancellation)."""
    D, V = 4, 300
    h = jnp.ones((3, D)) * jnp.array([[10.0], [30.0], [60.0]])
    w = jax.random.normal(jax.random.key(1), (D, V))
    t = jnp.zeros((3,), jnp.int32)
    got = token_logprobs(h, w, t, return_entropy=True, block_sizes=BlockSizes(block_v=64))[1]
    want = token_logprobs_naive(h, w, t, return_entropy=True)[1]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_no_intermediate_has_n_times_v_elements():
    """The reference and both Pallas backends (forward + backward) never hold an [N, V]-sized value."""
    N, D, V = 64, 8, 1024
    h, w, t, _, _ = _problem(N, D, V)
    for impl, blocks in (("xla", BlockSizes(block_v=128)), ("pallas_tpu", TPU_BLOCKS), ("pallas_gpu", GPU_BLOCKS)):
        f = jax.grad(lambda h, w: token_logprobs(h, w, t, impl=impl, interpret=True, block_sizes=blocks,
                                                 return_entropy=True)[1].sum(), argnums=(0, 1))
        biggest = max(_sizes(jax.make_jaxpr(f)(h, w).jaxpr))
        assert biggest < N * V, (impl, biggest)
    naive = jax.grad(lambda h: token_logprobs_naive(h, w, t).sum())
    assert max(_sizes(jax.make_jaxpr(naive)(h).jaxpr)) >= N * V  # the check can fail


def _sizes(jaxpr):
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield int(np.prod(getattr(v.aval, "shape", ())))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _sizes(inner)
    yield 0


# ----------------------------------------------------------------------------- Pallas kernels, interpret mode


@st.composite
def _cases(draw):
    return dict(
        N=draw(st.integers(1, 40)),
        D=draw(st.sampled_from([8, 24])),
        V=draw(st.integers(2, 300)),
        dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        temperature=draw(st.sampled_from([1.0, 0.6])),
        softcap=draw(st.sampled_from([None, 2.5])),
        return_entropy=draw(st.booleans()),
    )


def _check_kernel(impl, N, D, V, dtype, temperature, softcap, return_entropy, interpret=True):
    h, w, t, g_lp, g_ent = _problem(N, D, V, dtype, seed=N * 1000 + V)
    kw = dict(temperature=temperature, softcap=softcap, return_entropy=return_entropy)
    got = _value_and_grads(
        functools.partial(token_logprobs, impl=impl, interpret=interpret, block_sizes=BLOCKS[impl]),
        h, w, t, g_lp, g_ent, **kw)
    want = _value_and_grads(token_logprobs_reference, h, w, t, g_lp, g_ent, **kw)
    _compare(got, want, dtype)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernel_ragged_edges(impl, dtype):
    """N and V not multiples of the blocks (the interpreter pads edge blocks with nan)."""
    _check_kernel(impl, 37, 24, 301, dtype, 0.8, 3.0, True)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
@settings(max_examples=5, deadline=None, derandomize=True, database=None)
@given(case=_cases())
def test_kernel_matches_reference(impl, case):
    _check_kernel(impl, **case)


def test_tpu_kernel_in_mosaic_interpreter():
    """The slower TPU interpreter (DMA and VMEM semantics, nan for out-of-bounds reads)."""
    params = pltpu.InterpretParams(out_of_bounds_reads="uninitialized", uninitialized_memory="nan")
    _check_kernel("pallas_tpu", 21, 8, 200, jnp.float32, 1.0, None, True, interpret=params)


def test_gpu_kernels_lower_to_triton():
    """The Triton kernels lower for CUDA on this CPU host (compiling to PTX needs a GPU or an AOT target):
    the forward, and the dz kernel of the backward's chunk loop and of its tail chunk."""
    h = jax.ShapeDtypeStruct((100, 48), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((48, 1000), jnp.bfloat16)
    t = jax.ShapeDtypeStruct((100,), jnp.int32)
    blocks = dataclasses.replace(BlockSizes.for_gpu(48, jnp.bfloat16), chunk_v=384)  # 1000 = 2 * 384 + 232

    def loss(h, w, t):
        lp, ent = token_logprobs(h, w, t, impl="pallas_gpu", softcap=30.0, return_entropy=True,
                                 block_sizes=blocks)
        return lp.sum() + ent.sum()

    traced = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(h, w, t)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3


def test_gpu_forward_vocab_splits():
    """Many token blocks and vocab blocks: the forward grid splits V, the last split is shorter."""
    N, D, V = 200, 8, 1290
    blocks = dataclasses.replace(GPU_BLOCKS, block_n=16, block_v=16)
    n_split, per_split = gpu.vocab_splits(N, V, 16, 16)
    assert n_split > 1 and per_split > 1 and pl.cdiv(V, 16) % per_split, (n_split, per_split)
    h, w, t, _, _ = _problem(N, D, V, seed=5)
    t = t.at[:3].set(jnp.array([-1, V, 2 * V]))
    for softcap, temperature in ((None, 1.0), (3.0, 0.7)):
        kw = dict(temperature=temperature, softcap=softcap, return_entropy=True)
        got = token_logprobs(h, w, t, impl="pallas_gpu", interpret=True, block_sizes=blocks, **kw)
        want = token_logprobs_reference(h, w, t, **kw)
        for g, r in zip(got, want):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_v", [96, 100, 512])  # loop + tail; loop only (300 = 3 * 100); one chunk
def test_gpu_backward_chunks(chunk_v):
    """The backward's vocabulary chunks (a tail one too) give the gradients of the reference."""
    blocks = dataclasses.replace(GPU_BLOCKS, chunk_v=chunk_v)
    for dtype in (jnp.float32, jnp.bfloat16):
        h, w, t, g_lp, g_ent = _problem(21, 24, 300, dtype, seed=chunk_v)
        kw = dict(temperature=0.8, softcap=4.0, return_entropy=True)
        got = _value_and_grads(functools.partial(token_logprobs, impl="pallas_gpu", interpret=True,
                                                 block_sizes=blocks), h, w, t, g_lp, g_ent, **kw)
        want = _value_and_grads(token_logprobs_reference, h, w, t, g_lp, g_ent, **kw)
        _compare(got, want, dtype)


def test_gpu_out_of_range_targets_gradients():
    """Ids outside [0, V) (other vocab shards' targets) hit no column in any backward chunk either."""
    N, D, V = 8, 16, 300
    h, w, _, g_lp, _ = _problem(N, D, V, seed=11)
    t = jnp.array([-1, -97, 300, 395, 10**6, 5, 96, 299], jnp.int32)  # -97 / 395: one chunk away
    got = _value_and_grads(functools.partial(token_logprobs, impl="pallas_gpu", interpret=True,
                                             block_sizes=GPU_BLOCKS), h, w, t, g_lp, None, return_entropy=False)
    want = _value_and_grads(token_logprobs_reference, h, w, t, g_lp, None, return_entropy=False)
    _compare(got, want, jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "pallas_tpu", "pallas_gpu"])
def test_targets_out_of_range_give_minus_lse(impl):
    """A target outside [0, V) matches no column (what each vocab shard sees for the others' targets)."""
    h, w, _, _, _ = _problem(6, 8, 150)
    t = jnp.array([-1, 150, 160, 255, 256, 10**6], jnp.int32)
    lp = token_logprobs(h, w, t, impl=impl, interpret=True, block_sizes=BLOCKS[impl])
    want = -jax.nn.logsumexp(h @ w, axis=-1)
    np.testing.assert_allclose(lp, want, rtol=1e-5, atol=1e-5)


def test_auto_is_xla_on_cpu():
    h, w, t, _, _ = _problem(9, 8, 50)
    np.testing.assert_array_equal(token_logprobs(h, w, t), token_logprobs(h, w, t, impl="xla"))


def test_mixed_dtypes_promote():
    h, w, t, _, _ = _problem(9, 8, 50)
    got = token_logprobs(h.astype(jnp.bfloat16), w, t, impl="pallas_tpu", interpret=True, block_sizes=TPU_BLOCKS)
    want = token_logprobs_reference(h.astype(jnp.bfloat16).astype(jnp.float32), w, t)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    dh = jax.grad(lambda h: token_logprobs(h, w, t).sum())(h.astype(jnp.bfloat16))
    assert dh.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- sharded


@pytest.mark.parametrize("impl,vocab_axis,axis_type", [
    ("xla", None, AxisType.Auto), ("xla", "tensor", AxisType.Auto), ("pallas_tpu", None, AxisType.Auto),
    ("pallas_tpu", "tensor", AxisType.Auto), ("pallas_gpu", "tensor", AxisType.Auto),
    ("xla", "tensor", AxisType.Explicit)])
def test_sharded_equals_single_device(impl, vocab_axis, axis_type):
    assert len(jax.devices()) == 8
    if axis_type == AxisType.Auto:
        mesh = make_mesh(data=2, fsdp=2, tensor=2)
    else:
        mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(axis_type,) * 3)
    N, D, V = 32, 16, 258  # 129 vocab columns per tensor shard: a ragged vocab block per shard
    h, w, t, g_lp, g_ent = _problem(N, D, V, seed=7)
    kw = dict(temperature=0.9, softcap=4.0, return_entropy=True)
    sharded = functools.partial(token_logprobs_sharded, mesh=mesh, vocab_axis=vocab_axis, impl=impl,
                                interpret=True, block_sizes=BLOCKS[impl])
    got = _value_and_grads(sharded, h, w, t, g_lp, g_ent, **kw)
    want = _value_and_grads(token_logprobs_reference, h, w, t, g_lp, g_ent, **kw)
    _compare(got, want, jnp.float32)


def test_sharded_validation():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    h, w, t, _, _ = _problem(30, 8, 64)
    with pytest.raises(ValueError, match="N=30"):
        token_logprobs_sharded(h, w, t, mesh=mesh)
    h, w, t, _, _ = _problem(32, 8, 63)
    with pytest.raises(ValueError, match="V=63"):
        token_logprobs_sharded(h, w, t, mesh=mesh, vocab_axis="tensor")
    with pytest.raises(ValueError, match="vocab_axis='model'"):
        token_logprobs_sharded(h, w, t, mesh=mesh, vocab_axis="model")


# ----------------------------------------------------------------------------- validation


def _bad_calls():
    h, w, t = jnp.zeros((4, 8)), jnp.zeros((8, 10)), jnp.zeros((4,), jnp.int32)
    return [
        ("hidden must be rank 2", (h[None], w, t), {}),
        ("unembed must be rank 2", (h, w[None], t), {}),
        (r"hidden.shape\[1\] \(D=8\) must equal unembed.shape\[0\]", (h, w[:5], t), {}),
        ("targets must have shape", (h, w, t[:3]), {}),
        ("targets must have shape", (h, w, t[:, None]), {}),
        ("targets must have an integer dtype", (h, w, t.astype(jnp.float32)), {}),
        ("hidden must have a floating dtype", (h.astype(jnp.int32), w, t), {}),
        ("temperature must be", (h, w, t), dict(temperature=0.0)),
        ("temperature must be", (h, w, t), dict(temperature=jnp.float32(1.0))),
        ("softcap must be", (h, w, t), dict(softcap=-1.0)),
        ("impl must be one of", (h, w, t), dict(impl="cuda")),
        ("block_sizes must be", (h, w, t), dict(block_sizes=(512, 1024))),
    ]


@pytest.mark.parametrize("match,args,kwargs", _bad_calls(), ids=lambda x: x if isinstance(x, str) else "")
def test_validation_errors(match, args, kwargs):
    with pytest.raises(ValueError, match=match):
        token_logprobs(*args, **kwargs)


def test_block_sizes_validation():
    with pytest.raises(ValueError, match="block_v"):
        BlockSizes(block_v=0)
    with pytest.raises(ValueError, match="D=131072"):
        BlockSizes.for_tpu(131072, jnp.bfloat16)
    with pytest.raises(ValueError, match="block_n=24 must be a multiple of 16"):
        token_logprobs(jnp.zeros((40, 8)), jnp.zeros((8, 10)), jnp.zeros((40,), jnp.int32), impl="pallas_tpu",
                       interpret=True, block_sizes=BlockSizes(block_n=24))
    with pytest.raises(ValueError, match="block_v=48 must be a power of two"):
        token_logprobs(jnp.zeros((4, 8)), jnp.zeros((8, 10)), jnp.zeros((4,), jnp.int32), impl="pallas_gpu",
                       interpret=True, block_sizes=BlockSizes(block_v=48))
    with pytest.raises(ValueError, match="block_n_dz=24 must be a power of two"):
        jax.grad(lambda h: token_logprobs(h, jnp.zeros((8, 10)), jnp.zeros((4,), jnp.int32), impl="pallas_gpu",
                                          interpret=True, block_sizes=BlockSizes(block_n_dz=24)).sum())(
            jnp.zeros((4, 8)))
