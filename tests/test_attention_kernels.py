"""Attention: the reference against a hand-written dense softmax, and the Pallas TPU / GPU backends (interpret
mode on CPU) against the reference, outputs and gradients, over hypothesis-drawn small shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh

from polmjax.kernels.attention import flash
from polmjax.kernels.attention.ops import IMPLS, BlockSizes, attention, attention_sharded
from polmjax.kernels.attention.reference import attention_mask, attention_reference

PALLAS = ("pallas_tpu", "pallas_gpu")
# Max error relative to the largest reference value: float32 kernels agree to rounding; bf16 kernels round
# probabilities and matmul inputs at different points than the reference (both are ~5e-3 from float32).
TOLERANCE = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 3e-2}


def _inputs(seed, B, T, S, H, G, K, dtype):
    kq, kk, kv, kd = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(kq, (B, T, H, K), dtype), jax.random.normal(kk, (B, S, G, K), dtype),
            jax.random.normal(kv, (B, S, G, K), dtype), jax.random.normal(kd, (B, T, H, K), dtype))


# Interpret-mode kernels are big XLA:CPU programs run once: compiling them without the expensive LLVM
# passes halves the file's run time and changes no result.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit_run(fn, *args):
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)(*args)


# The reference against a dense softmax written out per query ---------------------------------------


def _naive(q, k, v, *, causal=True, segment_ids=None, window=None, softcap=None, scale=None, q_offset=None):
    """Attention one query row at a time in float64, from the definition of every option."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    scale = K**-0.5 if scale is None else scale
    offset = S - T if q_offset is None else q_offset
    q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            for t in range(T):
                pos = offset + t
                seen = [
                    s for s in range(S)
                    if (not causal or s <= pos)
                    and (window is None or (pos - s < window and (causal or s - pos < window)))
                    and (q_seg is None or q_seg[b, t] == kv_seg[b, s])
                ]
                if not seen:
                    continue  # a query that sees nothing outputs zeros
                logits = scale * (k[b, seen, g] @ q[b, t, h])
                if softcap is not None:
                    logits = softcap * np.tanh(logits / softcap)
                p = np.exp(logits - logits.max())
                out[b, t, h] = (p / p.sum()) @ v[b, seen, g]
    return out


NAIVE_CASES = {
    "causal": dict(),
    "bidirectional": dict(causal=False),
    "gqa_r4": dict(H=8, G=2),
    "mqa": dict(H=4, G=1),
    "segments": dict(segment_ids=np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2], [5, 5, 5, 5, 5, 5, 7, 7, 7]])),
    "window": dict(window=3),
    "window_bidirectional": dict(causal=False, window=2),
    "softcap": dict(softcap=0.7, scale=1.3),
    "q_offset_decode": dict(T=2, q_offset=4),  # 2 new queries at key positions 4 and 5 of 9
    "q_offset_default": dict(T=3),  # default S - T: the last 3 keys' positions
    "q_offset_negative": dict(T=5, q_offset=-2),  # the first two queries see no key: zeros
    "cross_segments": dict(T=4, segment_ids=(np.array([[1, 1, 9, 2], [3, 3, 3, 3]]),
                                             np.array([[1, 1, 1, 2, 2, 2, 2, 2, 2], [3] * 9]))),
}


def _naive_case(name):
    """(case options, q, k, v, dout, reference keyword arguments) of NAIVE_CASES[name]."""
    case = dict(NAIVE_CASES[name])
    B, T, S, H, G, K = 2, case.pop("T", 9), 9, case.pop("H", 4), case.pop("G", 2), 8
    q, k, v, dout = _inputs(0, B, T, S, H, G, K, jnp.float32)
    segs = case.get("segment_ids")
    if isinstance(segs, tuple):
        q_seg, kv_seg = (jnp.asarray(x) for x in segs)
    elif segs is not None:
        q_seg = kv_seg = jnp.asarray(segs)
    else:
        q_seg = kv_seg = None
    kwargs = {name: value for name, value in case.items() if name != "segment_ids"}
    return case, q, k, v, dout, dict(kwargs, q_segment_BT=q_seg, kv_segment_BS=kv_seg)


@pytest.mark.parametrize("name", sorted(NAIVE_CASES))
def test_reference_matches_dense_softmax(name):
    case, q, k, v, _, kwargs = _naive_case(name)
    got = _jit_run(lambda q, k, v: attention_reference(q, k, v, **kwargs), q, k, v)
    want = _naive(q, k, v, **case)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-6, rtol=2e-6)
    if name == "q_offset_negative":
        assert not np.asarray(got)[:, :2].any()


def _dense(q, k, v, *, causal=True, q_segment_BT=None, kv_segment_BS=None, window=None, softcap=None,
           scale=None, q_offset=None):
    """The textbook layout in jnp: kv heads repeated, [B, H, T, S] probabilities normalised before the
    product with v; a row that sees no key gives zeros (and no gradient)."""
    B, T, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    mask_B1TS = attention_mask(T, S, causal=causal, q_offset=S - T if q_offset is None else q_offset,
                               window=window, q_segment_BT=q_segment_BT, kv_segment_BS=kv_segment_BS)[:, None]
    k_BSHK, v_BSHK = jnp.repeat(k, H // G, axis=2), jnp.repeat(v, H // G, axis=2)
    logits_BHTS = jnp.einsum("bthk,bshk->bhts", q, k_BSHK) * (K**-0.5 if scale is None else scale)
    if softcap is not None:
        logits_BHTS = softcap * jnp.tanh(logits_BHTS / softcap)
    logits_BHTS = jnp.where(mask_B1TS, logits_BHTS, -jnp.inf)
    m = jax.lax.stop_gradient(logits_BHTS.max(axis=-1, keepdims=True))
    e_BHTS = jnp.exp(logits_BHTS - jnp.where(jnp.isfinite(m), m, 0.0))
    p_BHTS = e_BHTS / jnp.maximum(e_BHTS.sum(axis=-1, keepdims=True), 1e-30)
    return jnp.einsum("bhts,bshk->bthk", p_BHTS, v_BSHK)


@pytest.mark.parametrize("name", sorted(NAIVE_CASES))
def test_reference_gradients_match_dense_softmax(name):
    """The reference's layout (grouped heads, normalised after the product with v) changes no gradient."""
    _, q, k, v, dout, kwargs = _naive_case(name)

    def value_and_vjp(fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **kwargs), q, k, v)
        return (out, *vjp(dout))

    got = _jit_run(lambda: value_and_vjp(attention_reference))
    want = _jit_run(lambda: value_and_vjp(_dense))
    for what, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=2e-5, err_msg=what)


# Pallas backends in interpret mode against the reference -------------------------------------------


def _value_and_vjp(q, k, v, dout, segment_ids, q_offset, *, impl, options):
    """(out, dq, dk, dv) of attention(impl) under the cotangent dout; options: attention kwargs."""

    def run(q, k, v, dout, segment_ids, q_offset):
        kwargs = dict(options) if q_offset is None else dict(options, q_offset=q_offset)
        fn = lambda q, k, v: attention(q, k, v, segment_ids=segment_ids, impl=impl, **kwargs)  # noqa: E731
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(dout))

    return _jit_run(run, q, k, v, dout, segment_ids, q_offset)


def _check_backend(impl, q, k, v, dout, *, segment_ids=None, q_offset=None, **options):
    if isinstance(q_offset, int):  # a Python int stays static; an array (np.int32 too) is traced
        options["q_offset"], q_offset = q_offset, None
    pallas_options = dict(options, interpret=True)
    got = _value_and_vjp(q, k, v, dout, segment_ids, q_offset, impl=impl, options=pallas_options)
    want = _value_and_vjp(q, k, v, dout, segment_ids, q_offset, impl="xla", options=options)
    tol = TOLERANCE[jnp.dtype(q.dtype)]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, g.dtype, w.shape, w.dtype)
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.isfinite(g).all(), f"{impl} {name}: non-finite values"
        err = np.max(np.abs(g - w)) if g.size else 0.0
        bound = tol * max(float(np.max(np.abs(w))) if w.size else 0.0, 1.0)  # inputs are O(1)
        assert err <= bound, f"{impl} {name}: max error {err:.3g} > {bound:.3g} ({options}, q_offset={q_offset})"
    return got


def _segments(draw, B, L, n_docs):
    """Document ids [B, L] of up to n_docs packed documents per row, as a hypothesis draw."""
    rows = []
    for _ in range(B):
        cuts = draw(st.lists(st.integers(0, L), min_size=n_docs - 1, max_size=n_docs - 1))
        rows.append(np.searchsorted(np.sort(cuts), np.arange(L), side="right"))
    return np.stack(rows).astype(np.int32)


@st.composite
def attention_cases(draw):
    """Small shapes with odd lengths, GQA ratios 1/2/4/8, and every masking option."""
    B = draw(st.integers(1, 2))
    G = draw(st.sampled_from([1, 2]))
    R = draw(st.sampled_from([1, 2, 4, 8]))
    K = draw(st.sampled_from([32, 64, 128]))
    T = draw(st.integers(1, 300))
    self_attention = draw(st.booleans())
    S = T if self_attention else draw(st.integers(1, 300))
    case = dict(B=B, T=T, S=S, H=G * R, G=G, K=K, seed=draw(st.integers(0, 2**16)),
                dtype=draw(st.sampled_from(["float32", "bfloat16"])), causal=draw(st.booleans()))
    if draw(st.booleans()):
        case["window"] = draw(st.integers(1, 160))
    if draw(st.booleans()):
        case["softcap"] = draw(st.floats(0.5, 30.0))
    if draw(st.booleans()):
        case["scale"] = draw(st.floats(0.05, 1.0))
    if self_attention and draw(st.booleans()):
        case["segment_ids"] = _segments(draw, B, T, draw(st.integers(1, 4)))
    elif not self_attention and draw(st.booleans()):
        case["q_offset"] = draw(st.integers(-3, S))
    return case


def _run_case(impl, case):
    case = dict(case)
    shape = [case.pop(name) for name in ("seed", "B", "T", "S", "H", "G", "K")]
    q, k, v, dout = _inputs(*shape, jnp.dtype(case.pop("dtype")))
    segs = case.pop("segment_ids", None)
    _check_backend(impl, q, k, v, dout, segment_ids=None if segs is None else jnp.asarray(segs), **case)


@pytest.mark.parametrize("impl", PALLAS)
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=attention_cases())
def test_pallas_matches_reference_drawn(impl, case):
    _run_case(impl, case)


# Fixed cases, so every path runs whatever hypothesis draws: the TPU layouts (head dim 128 -> [B, T, H*K]
# view, else transposed), MQA with R=8, segments + window + softcap in bf16, a traced q_offset (KV-cache
# decoding under jit takes the kernel path), negative offsets, tiles that need no mask at all, and
# several blocks along both axes.
FIXED_CASES = {
    "gqa8_segments_window_softcap_bf16": dict(B=2, T=257, S=257, H=8, G=1, K=128, dtype="bfloat16", window=70,
                                              softcap=5.0, segment_ids=[[0] * 100 + [1] * 157, [2] * 257]),
    "bidirectional_unpadded": dict(B=1, T=256, S=256, H=2, G=2, K=64, dtype="float32", causal=False),
    "decode_traced_offset": dict(B=2, T=3, S=290, H=4, G=2, K=64, dtype="float32", q_offset=np.int32(250),
                                 window=64),
    "negative_offset_window": dict(B=1, T=140, S=270, H=4, G=1, K=32, dtype="float32", q_offset=-7, window=50),
    "bidirectional_window_cross": dict(B=1, T=200, S=300, H=2, G=1, K=128, dtype="bfloat16", causal=False,
                                       window=40, q_offset=60),
}


@pytest.mark.parametrize("name", sorted(FIXED_CASES))
@pytest.mark.parametrize("impl", PALLAS)
def test_pallas_matches_reference_fixed(impl, name):
    case = dict(FIXED_CASES[name], seed=1)
    case.setdefault("causal", True)
    if "segment_ids" in case:
        case["segment_ids"] = np.asarray(case["segment_ids"], np.int32)
    _run_case(impl, case)


@pytest.mark.parametrize("impl", PALLAS)
def test_pallas_rows_that_see_nothing_are_zero(impl):
    """Cross segments where a query id has no key: zero output and zero, finite gradients."""
    q, k, v, dout = _inputs(4, 1, 6, 130, 2, 1, 32, jnp.float32)
    q_seg = jnp.array([[1, 1, 7, 2, 2, 7]], jnp.int32)
    kv_seg = jnp.array([[1] * 60 + [2] * 70], jnp.int32)
    out, dq, _, _ = _check_backend(impl, q, k, v, dout, segment_ids=(q_seg, kv_seg), causal=False)
    assert not np.asarray(out)[0, [2, 5]].any() and not np.asarray(dq)[0, [2, 5]].any()


@pytest.mark.parametrize("impl", PALLAS)
def test_pallas_backward_block_sizes_differ_from_forward(impl):
    blocks = BlockSizes(256, 128, 128, 256) if impl == "pallas_tpu" else BlockSizes(64, 16, 16, 32)
    q, k, v, dout = _inputs(5, 1, 300, 300, 4, 2, 64, jnp.float32)
    _check_backend(impl, q, k, v, dout, block_sizes=blocks, window=100)


def test_auto_is_xla_on_cpu():
    q, k, v, _ = _inputs(6, 1, 7, 7, 2, 1, 16, jnp.float32)
    np.testing.assert_array_equal(np.asarray(attention(q, k, v)), np.asarray(attention(q, k, v, impl="xla")))
    assert IMPLS == ("auto", "xla", "pallas_tpu", "pallas_gpu", "cudnn")


def test_gpu_kernels_lower_to_triton():
    """Lowering for CUDA on this CPU host runs the real Pallas -> Triton lowering of all three kernels."""
    q = jax.ShapeDtypeStruct((1, 100, 4, 96), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, 100, 2, 96), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((1, 100), jnp.int32)
    offset = jax.ShapeDtypeStruct((), jnp.int32)

    def loss(q, k, v, seg, offset):
        out = attention(q, k, v, impl="pallas_gpu", segment_ids=seg, window=32, softcap=20.0, q_offset=offset)
        return jnp.sum(out.astype(jnp.float32))

    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(q, k, k, seg, offset)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("polmjax_flash_") >= 3  # forward, dq, dkv kernels


# Sharded wrapper on 8 CPU devices ---------------------------------------------------------------------


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 2, 4)])
def test_attention_sharded_matches_single_device(mesh_shape):
    """Batch over (data, fsdp), heads over tensor. G=2 kv heads: split over tensor=2; replicated over
    tensor=4, where each device slices the one kv head its two query heads use."""
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(mesh_shape), ("data", "fsdp", "tensor"))
    q, k, v, dout = _inputs(7, 4, 130, 130, 8, 2, 32, jnp.float32)
    seg = jnp.asarray(np.repeat(np.array([[0] * 60 + [1] * 70]), 4, axis=0), jnp.int32)

    def run(fn):
        def go(q, k, v, dout):
            out, vjp = jax.vjp(fn, q, k, v)
            return (out, *vjp(dout))

        return _jit_run(go, q, k, v, dout)

    sharded = run(lambda q, k, v: attention_sharded(q, k, v, mesh=mesh, segment_ids=seg, window=50,
                                                    impl="pallas_tpu", interpret=True))
    single = run(lambda q, k, v: attention(q, k, v, segment_ids=seg, window=50, impl="xla"))
    for name, a, b in zip(("out", "dq", "dk", "dv"), sharded, single):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5, err_msg=name)


def test_attention_sharded_rejects_mixed_groups():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 2, 4), ("data", "fsdp", "tensor"))
    q, k = jnp.zeros((2, 8, 12, 16)), jnp.zeros((2, 8, 3, 16))  # 3 query heads per device, R = 4
    with pytest.raises(ValueError, match="kv heads 3"):
        attention_sharded(q, k, k, mesh=mesh, impl="pallas_tpu", interpret=True)


# Validation errors name the argument ---------------------------------------------------------------


def _small():
    return _inputs(9, 1, 8, 8, 2, 1, 16, jnp.bfloat16)[:3]


@pytest.mark.parametrize("kwargs,match", [
    (dict(impl="flash"), "impl='flash'"),
    (dict(impl="pallas_tpu", block_sizes=(128, 128)), "block_sizes"),
    (dict(impl="pallas_tpu", interpret=True, block_sizes=BlockSizes(100, 128)), "block_q=100"),
    (dict(impl="pallas_gpu", interpret=True, block_sizes=BlockSizes(32, 48)), "block_kv=48"),
    (dict(impl="cudnn", softcap=30.0), "softcap"),
    (dict(impl="cudnn", q_offset=3), "q_offset"),
    (dict(impl="cudnn", causal=False, window=4), "window"),
    (dict(window=0), "window"),
    (dict(softcap=-1.0), "softcap"),
    (dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), "segment_ids"),
])
def test_validation_errors_name_the_argument(kwargs, match):
    q, k, v = _small()
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **kwargs)


def test_validation_cudnn_dtype_and_traced_window():
    q, k, v = (x.astype(jnp.float32) for x in _small())
    with pytest.raises(ValueError, match="dtype float32"):
        attention(q, k, v, impl="cudnn")
    with pytest.raises(ValueError, match="window must be a Python number"):
        jax.jit(lambda w: attention(q, k, v, impl="pallas_tpu", interpret=True, window=w))(jnp.int32(3))
    with pytest.raises(ValueError, match="BlockSizes.block_q"):
        BlockSizes(block_q=0)


def test_block_ranges_match_brute_force():
    """The tile skipping: kv_block_range / q_block_range are exactly the span of tiles with a visible pair,
    and full_kv_block_range / full_q_block_range (tiles computed without a mask) are exactly the tiles
    whose every pair is visible, padded keys counting as masked. Brute force over positions."""
    rng = np.random.default_rng(0)
    for _ in range(150):
        T, S = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        bq, bk = int(rng.choice([2, 4, 8])), int(rng.choice([2, 4, 8]))
        causal, window = bool(rng.integers(2)), (None if rng.integers(2) else int(rng.integers(1, 12)))
        off = int(rng.integers(-5, 30))
        static = flash.Static(causal, window, None, 1.0, BlockSizes(), False)
        nq, nk = -(-T // bq), -(-S // bk)
        pos, key = off + np.arange(T)[:, None], np.arange(nk * bk)[None, :]
        mask = (key < S) & ((key <= pos) | (not causal))
        if window is not None:
            mask &= (pos - key < window) & ((key - pos < window) | causal)
        tiles = [[mask[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk] for j in range(nk)] for i in range(nq)]
        any_ = np.array([[t.any() for t in row] for row in tiles])
        all_ = np.array([[t.all() for t in row] for row in tiles])

        b = np.arange(32, dtype=np.int32)  # one shape for every draw: the eager jnp ops compile once
        q_first, q_last = off + b * bq, off + np.minimum(b * bq + bq, T) - 1
        k_first, k_last = b * bk, np.minimum(b * bk + bk, S) - 1
        kv = flash.kv_block_range(q_first, q_last, bk=bk, nk=nk, static=static)
        kv_full = flash.full_kv_block_range(q_first, q_last, bk=bk, S=S, static=static)
        qr = flash.q_block_range(k_first, k_last, off, bq=bq, nq=nq, static=static)
        q_full = flash.full_q_block_range(k_first, b * bk + bk - 1, off, bq=bq, nq=nq, S=S, static=static)
        # The q side takes the last query block as whole (its padded rows count): it may mask that
        # block where not needed, never the other way.
        for (lo, hi), (full_lo, full_hi), vis, full, slack in ((kv, kv_full, any_, all_, set()),
                                                             (qr, q_full, any_.T, all_.T, {nq - 1})):
            lo, hi, full_lo, full_hi = (np.broadcast_to(np.asarray(x), b.shape) for x in (lo, hi, full_lo, full_hi))
            for n in range(len(vis)):
                case = (T, S, bq, bk, causal, window, off, n)
                seen = np.flatnonzero(vis[n])
                if seen.size:
                    assert (lo[n], hi[n]) == (seen[0], seen[-1]), case
                got_full = {x for x in range(len(full[n])) if full_lo[n] <= x <= full_hi[n]}
                want_full = set(np.flatnonzero(full[n]).tolist())
                assert got_full <= want_full and want_full - got_full <= slack, case


def test_polmjax_imports_without_the_triton_backend():
    """JAX 0.11 deprecates Pallas Triton: without it polmjax still imports and runs the XLA paths, and asking
    for pallas_gpu says what is missing. (A subprocess: the import system is left as it was.)"""
    import subprocess
    import sys

    script = """
import sys
sys.modules["jax.experimental.pallas.triton"] = None  # importing it raises ImportError
import jax.numpy as jnp
from polmjax import kernels
q = jnp.ones((1, 8, 2, 16))
assert kernels.attention(q, q, q, impl="xla").shape == q.shape
h, w, t = jnp.ones((4, 8)), jnp.ones((8, 32)), jnp.zeros((4,), jnp.int32)
assert kernels.token_logprobs(h, w, t, impl="xla").shape == (4,)
for call in (lambda: kernels.attention(q, q, q, impl="pallas_gpu", interpret=True),
             lambda: kernels.token_logprobs(h, w, t, impl="pallas_gpu", interpret=True)):
    try:
        call()
    except ImportError as err:
        assert "impl='pallas_gpu' needs jax.experimental.pallas.triton" in str(err), err
    else:
        raise AssertionError("pallas_gpu ran without the Triton backend")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
