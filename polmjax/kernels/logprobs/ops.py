"""`token_logprobs`: validation, backend dispatch, block sizes and the custom_vjp wiring of the kernels.

Every backend exposes the same two functions (see `reference.py` for the math):
  forward_stats(h, w, t) -> per-token (lse, target logit, entropy)
  backward(h, w, t, lse, entropy, g_lp, g_entropy) -> (dh, dw)
`_fused` turns them into (lp, entropy) with a custom_vjp. With the vocabulary sharded over a mesh axis
(`token_logprobs_sharded(..., vocab_axis="tensor")`), each shard's statistics are combined with
pmax/psum before lp is formed, and the backward recomputes its own vocabulary slice from the global
lse and entropy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from polmjax.kernels.backends import pallas_backend
from polmjax.kernels.logprobs import reference

IMPLS = ("auto", "xla", "pallas_tpu", "pallas_gpu")

_MiB = 1024 * 1024


def token_logprobs(
    hidden_ND: jax.Array,
    unembed_DV: jax.Array,
    targets_N: jax.Array,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    impl: str = "auto",
    interpret=False,
    block_sizes: BlockSizes | None = None,
):
    """log p(target) under softmax(softcap(hidden @ unembed) / temperature), never forming [N, V] logits.

    Args:
      hidden_ND: final hidden states [N tokens, D] (flatten [B, T, D] first).
      unembed_DV: output embedding [D, V] (the transpose of a tied input embedding).
      targets_N: integer token ids [N], in [0, V). Ids outside that range give lp = -logsumexp.
      temperature: Python float > 0; logits are divided by it (after the soft-cap).
      softcap: Python float > 0 or None; logits -> softcap * tanh(logits / softcap) (Gemma 2/3).
      return_entropy: also return the entropy -sum_v p log p of the same distribution.
      impl: "xla" (chunked jnp, the CPU path), "pallas_tpu", "pallas_gpu", or "auto" (Pallas on TPU
        and GPU, xla elsewhere). Under ahead-of-time compilation from a CPU host "auto" means xla:
        pass impl="pallas_tpu" (or use `token_logprobs_sharded`, which reads the mesh's devices).
      interpret: run a Pallas backend in interpret mode (CPU tests). True uses the generic
        interpreter; a `pltpu.InterpretParams()` uses the slower, more faithful TPU interpreter.
      block_sizes: tile sizes; default `BlockSizes.default(impl, D, dtype)` for this device.
    Returns:
      lp_N float32, or (lp_N, entropy_N) with return_entropy. Differentiable with respect to hidden
      and unembed (lp and entropy both); the backward recomputes the logits block by block.

    On sharded arrays use `token_logprobs_sharded`. Inside your own `jax.shard_map`, pass
    check_vma=False: the custom_vjp does not annotate varying mesh axes, and with check_vma=False the
    shard_map transpose sums the d_unembed partials of the token shards.
    """
    _check(hidden_ND, unembed_DV, targets_N, temperature, softcap, impl, block_sizes)
    impl = _resolve(impl)
    h_ND, w_DV = _common_dtype(hidden_ND, unembed_DV)
    blocks = block_sizes or BlockSizes.default(impl, h_ND.shape[1], h_ND.dtype, _local_device_kind())
    cfg = _Config(impl, float(temperature), None if softcap is None else float(softcap),
                  bool(return_entropy), blocks, interpret, None)
    if impl == "xla":
        return reference.token_logprobs_reference(
            h_ND, w_DV, targets_N, temperature=cfg.temperature, softcap=cfg.softcap,
            return_entropy=cfg.with_entropy, chunk_v=blocks.block_v,
        )
    return _fused(h_ND, w_DV, targets_N.astype(jnp.int32), cfg)


def token_logprobs_sharded(
    hidden_ND: jax.Array,
    unembed_DV: jax.Array,
    targets_N: jax.Array,
    *,
    mesh: Mesh,
    token_axes: Sequence[str] = ("data", "fsdp"),
    vocab_axis: str | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    impl: str = "auto",
    interpret=False,
    block_sizes: BlockSizes | None = None,
):
    """`token_logprobs` on sharded arrays: the kernels run per device under `jax.shard_map`.

    Tokens are split over `token_axes` (those present in the mesh); the vocabulary is replicated, or
    split over `vocab_axis` (e.g. "tensor"), in which case each device computes the lse, target logit
    and entropy of its vocabulary slice and they are combined with pmax/psum (no device holds all of
    V). hidden is [N, D] sharded over the token axes, unembed [D, V] (gathered over D if stored
    FSDP-sharded), targets [N]. Call it inside `jax.jit`; "auto" picks the backend from the mesh's
    devices, so a mesh of abstract TPU devices (ahead-of-time compilation) gets the Pallas TPU kernel.

    Gradients follow shard_map's convention: the d_unembed partials of the token shards are summed by
    shard_map's transpose, and the output cotangent is summed over the vocab axis in the backward.
    Returns lp_N (and entropy_N), sharded like targets.
    """
    _check(hidden_ND, unembed_DV, targets_N, temperature, softcap, impl, block_sizes)
    token_axes = tuple(a for a in token_axes if a in mesh.axis_names)
    if vocab_axis is not None and vocab_axis not in mesh.axis_names:
        raise ValueError(f"token_logprobs_sharded: vocab_axis={vocab_axis!r} is not a mesh axis {mesh.axis_names}")
    if vocab_axis in token_axes:
        raise ValueError(f"token_logprobs_sharded: vocab_axis={vocab_axis!r} is also a token axis {token_axes}")
    n_tok = math.prod(mesh.shape[a] for a in token_axes)
    n_voc = mesh.shape[vocab_axis] if vocab_axis else 1
    N, D = hidden_ND.shape
    V = unembed_DV.shape[1]
    if N % n_tok:
        raise ValueError(f"token_logprobs_sharded: hidden has N={N} tokens, not divisible by the "
                         f"{n_tok} devices of token_axes {token_axes}")
    if V % n_voc:
        raise ValueError(f"token_logprobs_sharded: unembed has V={V}, not divisible by the {n_voc} "
                         f"devices of vocab_axis {vocab_axis!r}")
    device = mesh.devices.flat[0]
    impl = _resolve(impl, device.platform)
    h_ND, w_DV = _common_dtype(hidden_ND, unembed_DV)
    blocks = block_sizes or BlockSizes.default(impl, D, h_ND.dtype, getattr(device, "device_kind", None))
    cfg = _Config(impl, float(temperature), None if softcap is None else float(softcap),
                  bool(return_entropy), blocks, interpret, vocab_axis)
    tok = token_axes or None
    in_specs = (P(tok, None), P(None, vocab_axis), P(tok))
    args = (h_ND, w_DV, targets_N.astype(jnp.int32))
    if AxisType.Explicit in mesh.axis_types:  # shard_map does not reshard explicitly-sharded inputs
        args = tuple(jax.sharding.reshard(x, NamedSharding(mesh, s)) for x, s in zip(args, in_specs))
    run = jax.shard_map(
        lambda h, w, t: _fused(h, w, t, cfg),
        mesh=mesh,
        in_specs=in_specs,
        out_specs=(P(tok), P(tok)) if return_entropy else P(tok),
        check_vma=False,
    )
    return run(*args)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the kernels: tokens x vocabulary columns per grid step.

    block_n/block_v: the forward (and, for impl="xla", block_v is the vocabulary chunk).
    TPU only: block_n_dh/block_v_dh, the backward d_hidden kernel; block_n_dw/block_v_dw, d_unembed;
      vmem_limit_bytes, the scoped-VMEM limit passed to Mosaic.
    GPU only: block_d, the contraction chunk over D (Triton tiles live in registers);
      block_n_dz/block_v_dz, the backward kernel that recomputes dz for one vocabulary chunk;
      chunk_v, the vocabulary columns per backward chunk (dz [N, chunk_v] is materialised and fed to
      two cuBLAS matmuls; see `gpu.py`).
    TPU: block_n a multiple of 16 and block_v of 128 (or the whole dimension); GPU: powers of two >= 16.
    """

    block_n: int = 512
    block_v: int = 1024
    block_n_dh: int = 256
    block_v_dh: int = 512
    block_n_dw: int = 256
    block_v_dw: int = 512
    block_d: int = 64
    block_n_dz: int = 64
    block_v_dz: int = 128
    chunk_v: int = 8192
    vmem_limit_bytes: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "vmem_limit_bytes" and (not isinstance(v, int) or v < 1):
                raise ValueError(f"BlockSizes: {f.name} must be a positive int, got {v!r}")

    @classmethod
    def default(cls, impl: str, d_model: int, dtype, device_kind: str | None = None) -> BlockSizes:
        if impl == "pallas_tpu":
            return cls.for_tpu(d_model, dtype, device_kind)
        if impl == "pallas_gpu":
            return cls.for_gpu(d_model, dtype)
        return cls(block_v=reference.DEFAULT_CHUNK_V)

    @classmethod
    def for_tpu(cls, d_model: int, dtype, device_kind: str | None = None) -> BlockSizes:
        """The largest tiles whose estimated VMEM (`tpu.vmem_bytes`) fits ~70% of the chip's VMEM.

        Larger block_n raises the forward's arithmetic intensity (unembed is streamed once per token
        block); larger block_v that of d_unembed (hidden streamed once per vocab block). device_kind
        ("TPU v5 lite", ...) selects the VMEM size; unknown: 64 MiB, the smallest of v5e/v5p/v6e.
        """
        capacity = _TPU_VMEM.get(device_kind, 64 * _MiB)
        budget, itemsize = int(0.7 * capacity), jnp.dtype(dtype).itemsize
        vmem_bytes = pallas_backend(__package__, "pallas_tpu").vmem_bytes
        pick = {}
        for kernel, prefs in (("fwd", _TPU_FWD_PREFS), ("dh", _TPU_DH_PREFS), ("dw", _TPU_DW_PREFS)):
            fits = [p for p in prefs if vmem_bytes(kernel, *p, d_model, itemsize) <= budget]
            if not fits:
                raise ValueError(
                    f"token_logprobs: D={d_model} ({jnp.dtype(dtype).name}) is too wide for the Pallas TPU "
                    f"kernel's {kernel} pass in {capacity // _MiB} MiB of VMEM (D is not tiled); use "
                    'impl="xla" or pass BlockSizes explicitly'
                )
            pick[kernel] = fits[0]
        return cls(
            block_n=pick["fwd"][0], block_v=pick["fwd"][1],
            block_n_dh=pick["dh"][0], block_v_dh=pick["dh"][1],
            block_n_dw=pick["dw"][0], block_v_dw=pick["dw"][1],
            vmem_limit_bytes=int(0.85 * capacity),
        )

    @classmethod
    def for_gpu(cls, d_model: int, dtype) -> BlockSizes:
        """Triton tiles for Hopper (H100/H200), chosen by compile-time resources, not measured speed
        (no GPU was at hand): the largest power-of-two tiles whose PTX compiles for sm_90a without
        register spills, entropy, soft-cap and temperature included, with 3 pipeline stages of the
        h / w tiles in shared memory (<= 96 KiB).

        bf16: forward and dz 128 x 128, block_d 64 (<= 215 registers/thread at 8 warps). fp32: forward
        128 x 128, dz 64 x 128 (dz at 128 x 128 reaches the 255-register cap), block_d 32.
        chunk_v: the largest power of two in [1024, 8192] whose unembedding chunk (D * chunk_v * itemsize)
        fits 32 MiB, so the dz kernel reads it from L2 (50 MiB on H100) for every token block; the dz
        temporary is N * chunk_v * itemsize bytes.
        """
        itemsize = jnp.dtype(dtype).itemsize
        chunk_v = 8192
        while chunk_v > 1024 and d_model * chunk_v * itemsize > 32 * _MiB:
            chunk_v //= 2
        if itemsize >= 4:
            return cls(block_n=128, block_v=128, block_n_dz=64, block_v_dz=128, block_d=32, chunk_v=chunk_v)
        return cls(block_n=128, block_v=128, block_n_dz=128, block_v_dz=128, block_d=64, chunk_v=chunk_v)


# (block_n, block_v) in order of preference; the first that fits VMEM is taken.
_TPU_FWD_PREFS = ((512, 1024), (512, 512), (256, 512), (256, 256), (128, 256), (128, 128), (64, 128))
_TPU_DH_PREFS = ((512, 512), (256, 512), (256, 256), (128, 256), (128, 128), (64, 128))
_TPU_DW_PREFS = ((512, 1024), (256, 1024), (256, 512), (256, 256), (128, 256), (128, 128), (64, 128))
_TPU_VMEM = {
    "TPU v5 lite": 128 * _MiB, "TPU v5e": 128 * _MiB,
    "TPU v5": 64 * _MiB, "TPU v5p": 64 * _MiB,
    "TPU v6 lite": 128 * _MiB, "TPU v6e": 128 * _MiB,
    "TPU v4": 16 * _MiB, "TPU v4 lite": 16 * _MiB,
}


# ----------------------------------------------------------------------------- custom_vjp wiring


@dataclasses.dataclass(frozen=True)
class _Config:
    impl: str
    temperature: float
    softcap: float | None
    with_entropy: bool
    blocks: BlockSizes
    interpret: object
    vocab_axis: str | None


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused(h_ND, w_DV, t_N, cfg):
    out, _ = _fused_fwd(h_ND, w_DV, t_N, cfg)
    return out


def _fused_fwd(h_ND, w_DV, t_N, cfg):
    t_local = _local_targets(t_N, w_DV.shape[1], cfg.vocab_axis)
    lse_N, tgt_N, ent_N = _backend(cfg, h_ND.shape[0])[0](h_ND, w_DV, t_local, with_entropy=cfg.with_entropy)
    if cfg.vocab_axis is not None:
        lse_N, tgt_N, ent_N = _combine_vocab_shards(lse_N, tgt_N, ent_N, cfg.vocab_axis)
    lp_N = tgt_N - lse_N
    out = (lp_N, ent_N) if cfg.with_entropy else lp_N
    return out, (h_ND, w_DV, t_local, lse_N, ent_N)


def _fused_bwd(cfg, res, g):
    h_ND, w_DV, t_local, lse_N, ent_N = res
    g_lp_N, g_ent_N = g if cfg.with_entropy else (g, None)
    if cfg.vocab_axis is not None:
        # shard_map (check_vma=False) hands each vocab shard a share of the replicated output's
        # cotangent; the true cotangent is their sum. The d_hidden partials are summed by its transpose.
        g_lp_N = jax.lax.psum(g_lp_N, cfg.vocab_axis)
        g_ent_N = None if g_ent_N is None else jax.lax.psum(g_ent_N, cfg.vocab_axis)
    dh_ND, dw_DV = _backend(cfg, h_ND.shape[0])[1](h_ND, w_DV, t_local, lse_N, ent_N, g_lp_N, g_ent_N)
    return dh_ND, dw_DV, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _backend(cfg, n_tokens):
    """(forward_stats, backward) of cfg.impl with the static arguments bound (xla for zero tokens:
    a Pallas grid cannot be empty)."""
    common = dict(temperature=cfg.temperature, softcap=cfg.softcap)
    if cfg.impl == "xla" or n_tokens == 0:
        common["chunk_v"] = cfg.blocks.block_v
        module = reference
    else:
        common.update(blocks=cfg.blocks, interpret=cfg.interpret)
        module = pallas_backend(__package__, cfg.impl)
    return (functools.partial(module.forward_stats, **common), functools.partial(module.backward, **common))


def _local_targets(t_N, v_local, vocab_axis):
    """Targets relative to this device's vocabulary slice (others fall outside [0, v_local))."""
    if vocab_axis is None:
        return t_N
    return t_N - jax.lax.axis_index(vocab_axis) * v_local


def _combine_vocab_shards(lse_N, tgt_N, ent_N, axis):
    """Global (lse, target logit, entropy) from per-shard ones: lse = log sum_s exp(lse_s),
    entropy = sum_s w_s (entropy_s + lse - lse_s) with shard weights w_s = exp(lse_s - lse)."""
    m_N = jax.lax.pmax(lse_N, axis)
    lse_all = m_N + jnp.log(jax.lax.psum(jnp.exp(lse_N - m_N), axis))
    tgt_all = jax.lax.psum(tgt_N, axis)
    ent_all = None
    if ent_N is not None:
        ent_all = jax.lax.psum(jnp.exp(lse_N - lse_all) * (ent_N + lse_all - lse_N), axis)
    return lse_all, tgt_all, ent_all


# ----------------------------------------------------------------------------- validation and dispatch


def _check(hidden, unembed, targets, temperature, softcap, impl, block_sizes):
    name = "token_logprobs"
    if getattr(hidden, "ndim", None) != 2:
        raise ValueError(f"{name}: hidden must be rank 2 [N, D], got shape {getattr(hidden, 'shape', None)}")
    if getattr(unembed, "ndim", None) != 2:
        raise ValueError(f"{name}: unembed must be rank 2 [D, V], got shape {getattr(unembed, 'shape', None)}")
    if hidden.shape[1] != unembed.shape[0]:
        raise ValueError(f"{name}: hidden.shape[1] (D={hidden.shape[1]}) must equal unembed.shape[0] "
                         f"({unembed.shape[0]}); got hidden {hidden.shape}, unembed {unembed.shape}")
    if getattr(targets, "shape", None) != (hidden.shape[0],):
        raise ValueError(f"{name}: targets must have shape [N] = ({hidden.shape[0]},) like hidden "
                         f"{hidden.shape}, got {getattr(targets, 'shape', None)}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"{name}: targets must have an integer dtype, got {targets.dtype}")
    for arg, x in (("hidden", hidden), ("unembed", unembed)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: {arg} must have a floating dtype, got {x.dtype}")
    if unembed.shape[1] < 1:
        raise ValueError(f"{name}: unembed has an empty vocabulary (shape {unembed.shape})")
    if isinstance(temperature, jax.Array) or not temperature > 0:
        raise ValueError(f"{name}: temperature must be a Python number > 0, got {temperature!r}")
    if softcap is not None and (isinstance(softcap, jax.Array) or not softcap > 0):
        raise ValueError(f"{name}: softcap must be None or a Python number > 0, got {softcap!r}")
    if impl not in IMPLS:
        raise ValueError(f"{name}: impl must be one of {IMPLS}, got {impl!r}")
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"{name}: block_sizes must be a BlockSizes or None, got {type(block_sizes).__name__}")


def _resolve(impl, platform=None):
    if impl != "auto":
        return impl
    platform = platform or jax.default_backend()
    if platform == "tpu":
        return "pallas_tpu"
    if platform in ("gpu", "cuda"):
        return "pallas_gpu"
    return "xla"


def _local_device_kind():
    return jax.devices()[0].device_kind if jax.default_backend() == "tpu" else None


def _common_dtype(h_ND, w_DV):
    dtype = jnp.promote_types(h_ND.dtype, w_DV.dtype)
    return h_ND.astype(dtype), w_DV.astype(dtype)
