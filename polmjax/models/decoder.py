"""The decoder: one parameter layout and one forward for every supported family.

Shape legend: B batch, T query length, S key length, D model width, H query heads, G kv heads,
K head dim, F MLP width, V vocabulary, L layers, N flattened tokens.

Per-layer parameters are stacked along a leading L axis. The forward either unrolls the layers or
(`scan_layers=True`) scans over groups of layers whose attention kinds repeat (Gemma 3: 5 local + 1
global), so every layer still sees a static window and rope: one representation, two schedules.
The pure functions (`init_params`, `forward_hidden`, `logits_from_hidden`) are what train steps use;
`Decoder` is the Flax NNX module holding the parameters, the config and the mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from polmjax import mesh as mesh_lib
from polmjax.kernels.attention import attention, attention_sharded
from polmjax.kernels.logprobs import token_logprobs, token_logprobs_sharded
from polmjax.models import rope as rope_lib
from polmjax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str  # "normal" | "zeros" | "ones" | "lora_a" (kaiming-uniform over the input dims, as PEFT)
    dtype: str | None = None  # None: cfg.param_dtype; LoRA adapters are float32


def param_specs(cfg: ModelConfig) -> dict[str, ParamSpec]:
    """Every parameter: flat name ("layers/q" for stacked per-layer ones) -> shape, logical axes, init."""
    D, F, H, G, K, V, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim, cfg.vocab_size, cfg.num_layers)
    norm_init = "zeros" if cfg.gemma_norm else "ones"
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal"),
        "final_norm": ParamSpec((D,), ("norm",), norm_init),
        "layers/attn_norm": ParamSpec((L, D), ("layers", "norm"), norm_init),
        "layers/q": ParamSpec((L, D, H, K), ("layers", "embed", "heads", "head_dim"), "normal"),
        "layers/k": ParamSpec((L, D, G, K), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "layers/v": ParamSpec((L, D, G, K), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "layers/o": ParamSpec((L, H, K, D), ("layers", "heads", "head_dim", "embed"), "normal"),
        "layers/mlp_norm": ParamSpec((L, D), ("layers", "norm"), norm_init),
        "layers/gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "layers/up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "layers/down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), "normal"),
    }
    if cfg.num_labels:  # sequence classifier / reward model: HF's `score` (no bias), no lm_head
        specs["score"] = ParamSpec((D, cfg.num_labels), ("embed", None), "normal")
    elif not cfg.tie_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"), "normal")
    if cfg.qkv_bias:
        specs["layers/q_bias"] = ParamSpec((L, H, K), ("layers", "heads", "head_dim"), "zeros")
        specs["layers/k_bias"] = ParamSpec((L, G, K), ("layers", "kv_heads", "head_dim"), "zeros")
        specs["layers/v_bias"] = ParamSpec((L, G, K), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.o_bias:
        specs["layers/o_bias"] = ParamSpec((L, D), ("layers", "norm"), "zeros")
    if cfg.mlp_bias:
        specs["layers/gate_bias"] = ParamSpec((L, F), ("layers", "mlp"), "zeros")
        specs["layers/up_bias"] = ParamSpec((L, F), ("layers", "mlp"), "zeros")
        specs["layers/down_bias"] = ParamSpec((L, D), ("layers", "norm"), "zeros")
    if cfg.qk_norm:
        specs["layers/q_norm"] = ParamSpec((L, K), ("layers", "head_dim"), norm_init)
        specs["layers/k_norm"] = ParamSpec((L, K), ("layers", "head_dim"), norm_init)
    if cfg.post_norms:
        specs["layers/attn_post_norm"] = ParamSpec((L, D), ("layers", "norm"), norm_init)
        specs["layers/mlp_post_norm"] = ParamSpec((L, D), ("layers", "norm"), norm_init)
    if cfg.lora is not None:
        for name in cfg.lora.targets:
            base = specs[f"layers/{name}"]
            n_in = len(PROJECTIONS[name][1])
            r = cfg.lora.rank
            specs[f"layers/{name}_lora_a"] = ParamSpec(
                base.shape[: 1 + n_in] + (r,), base.axes[: 1 + n_in] + ("lora_rank",), "lora_a", "float32")
            specs[f"layers/{name}_lora_b"] = ParamSpec(
                (L, r) + base.shape[1 + n_in:], ("layers", "lora_rank") + base.axes[1 + n_in:], "zeros", "float32")
    return specs


def init_params(cfg: ModelConfig, key: jax.Array, std: float = 0.02,
                only: Callable[[str], bool] | None = None) -> dict:
    """Random parameters as a nested dict {"embed": ..., "layers": {"q": ...}} in cfg.param_dtype.

    only(flat name) -> bool: draw just those parameters (fresh LoRA adapters), with the values the full
    draw gives them (parameter i of the sorted names always takes fold_in(key, i))."""
    flat = {}
    specs = param_specs(cfg)
    for i, (name, spec) in enumerate(sorted(specs.items())):
        if only is not None and not only(name):
            continue
        dtype = jnp.dtype(spec.dtype or cfg.param_dtype)
        k = jax.random.fold_in(key, i)
        if spec.init == "normal":
            flat[name] = (std * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype)
        elif spec.init == "lora_a":  # PEFT: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(math.prod(spec.shape[1:-1]))
            flat[name] = jax.random.uniform(k, spec.shape, jnp.float32, -bound, bound).astype(dtype)
        else:
            flat[name] = (jnp.zeros if spec.init == "zeros" else jnp.ones)(spec.shape, dtype)
    return unflatten(flat)


def unflatten(flat: dict) -> dict:
    out: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "/"))
        else:
            out[name] = v
    return out


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules=None) -> dict:
    """NamedShardings in the nested-dict layout of `init_params`."""
    return unflatten({
        name: mesh_lib.named_sharding(mesh, spec.axes, spec.shape, rules)
        for name, spec in param_specs(cfg).items()
    })


class KVCache(NamedTuple):
    """Preallocated keys/values of every layer for `S` positions, and how many are filled.

    k, v: one [L, B, G, S, K] array when `cfg.scan_layers` (the layer scan carries it), else a tuple of
    L per-layer [B, G, S, K] arrays (each layer reads its own buffer: no slice of a stacked array to copy
    out first, which XLA:CPU would do). Either way a forward writes only the new positions, in place.
    Heads before positions: a decode step's q.k and p.v products read the keys and values in stored
    order (XLA:TPU picks this layout itself; the CPU needs no transposed copies).
    segment_ids: [B, S] (the segment of each written key); index: int32 scalar, the slot the next token
    is written to (the same for every row: prompts are left-padded, and the pad tokens get their own
    segment id so that nothing attends to them).
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    segment_ids: jax.Array
    index: jax.Array

    @staticmethod
    def create(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
        dtype = jnp.dtype(dtype or cfg.compute_dtype)
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        if cfg.scan_layers:
            k, v = (jnp.zeros((cfg.num_layers, *shape), dtype) for _ in range(2))
        else:
            k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)) for _ in range(2))
        return KVCache(k, v, jnp.full((batch, max_len), -1, jnp.int32), jnp.zeros((), jnp.int32))


CACHE_AXES = ("layers", "act_batch", "act_kv_heads", "cache_len", "head_dim")  # a per-layer buffer: [1:]


class _Ctx(NamedTuple):
    cfg: ModelConfig
    mesh: Mesh | None
    rules: dict | None

    def constrain(self, x, *axes):
        return mesh_lib.constrain(x, axes, self.mesh, self.rules)

    def attention(self, q, k, v, impl=None, **kw):
        """`attention` with `impl` (default cfg.attention_impl); Pallas kernels on a mesh run per device
        under shard_map."""
        impl = _resolve_impl(impl or self.cfg.attention_impl, self.mesh)
        if impl.startswith("pallas"):
            kw["interpret"] = self.cfg.kernel_interpret
        if self.mesh is None or impl in ("xla", "cudnn"):
            return attention(q, k, v, impl=impl, **kw)
        return attention_sharded(q, k, v, mesh=self.mesh, impl=impl, **kw)


def _resolve_impl(impl: str, mesh: Mesh | None) -> str:
    """"auto" -> the Pallas backend of the devices the computation runs on (the mesh's), else xla."""
    if impl != "auto":
        return impl
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu"}.get(platform, "xla")


def forward_hidden(
    cfg: ModelConfig,
    params: dict,
    input_ids_BT: jax.Array,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
    cache: KVCache | None = None,
    *,
    mesh: Mesh | None = None,
    rules=None,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Final hidden states [B, T, D] (after the final norm, in compute dtype), and the updated cache.

    dropout_rng: enables LoRA dropout (training); None = deterministic.
    positions_BT default to 0..T-1 (cache.index + 0..T-1 with a cache); with packed documents pass
    positions that restart per document and `segment_ids_BT` (documents never attend to each other).
    """
    ctx = _Ctx(cfg, mesh, rules)
    B, T = input_ids_BT.shape
    dtype = jnp.dtype(cfg.compute_dtype)
    if positions_BT is None:
        start = 0 if cache is None else cache.index
        positions_BT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids_BT is None and cache is not None:
        segment_ids_BT = jnp.ones((B, T), jnp.int32)

    # The lookup gathers the table over fsdp first (as every FSDP weight is gathered for use) and keeps
    # the vocabulary split over tensor (masked gather + sum, as Megatron's vocab-parallel embedding):
    # from the stored (vocab, embed) sharding XLA's partitioner would replicate the gathered rows.
    embed_VD = ctx.constrain(params["embed"], "vocab", None)
    x_BTD = jnp.take(embed_VD, input_ids_BT, axis=0).astype(dtype)
    if cfg.embed_scale:
        x_BTD = x_BTD * jnp.asarray(math.sqrt(cfg.hidden_size), dtype)
    x_BTD = ctx.constrain(x_BTD, "act_batch", "act_len", "act_embed")

    ropes = {kind: rope_lib.cos_sin(positions_BT, cfg.rope_local if kind == "sliding" and cfg.rope_local
                                    else cfg.rope, cfg.head_dim)
             for kind in set(cfg.layer_types)}
    if cache is not None:
        kv_segment = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids_BT.astype(jnp.int32),
                                                  (0, cache.index))
        segments = (segment_ids_BT, kv_segment)
    else:
        segments = segment_ids_BT

    def layer(kind, x, p, kv, index, slot):
        fn = functools.partial(_block, ctx, kind, segments=segments, slot=slot,
                               q_offset=None if cache is None else cache.index)
        if cfg.remat != "none":
            fn = jax.checkpoint(fn, policy=_REMAT_POLICIES[cfg.remat])
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
        return fn(x, p, ropes[kind], kv, rng)

    layers = params["layers"]
    cache_kv = None
    if cache is not None:
        if isinstance(cache.k, tuple) == cfg.scan_layers:
            raise ValueError(f"forward_hidden: scan_layers={cfg.scan_layers} takes a cache of "
                             f"{'one stacked array' if cfg.scan_layers else 'per-layer arrays'}; create it with "
                             "KVCache.create(cfg, ...) or model.init_cache(...) for this config")
        cache_kv = jax.tree.map(lambda c: ctx.constrain(c, *CACHE_AXES[-c.ndim:]), (cache.k, cache.v))
    x_BTD, cache_kv = _run_layers(cfg, layer, x_BTD, layers, cache_kv)
    x_BTD = _rms_norm(cfg, x_BTD, params["final_norm"])
    new_cache = None
    if cache is not None:
        new_cache = KVCache(cache_kv[0], cache_kv[1], kv_segment, cache.index + T)
    return x_BTD, new_cache


def unembed_matrix(cfg: ModelConfig, params: dict) -> jax.Array:
    """[D, V]: the output projection (the embedding's transpose when tied)."""
    if cfg.num_labels:
        raise ValueError(f"a sequence classifier (num_labels={cfg.num_labels}) has no unembedding; use score_from_hidden")
    return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def score_from_hidden(cfg: ModelConfig, params: dict, x_BTD: jax.Array) -> jax.Array:
    """Float32 per-token scores [B, T, num_labels] of a sequence classifier (HF's `score(hidden_states)`).

    HF's `*ForSequenceClassification` reads them at each sequence's last non-pad token; the reward
    model step picks those positions with `polmjax.train.rm.last_token_mask`.
    """
    w_DC = params["score"].astype(x_BTD.dtype)
    return jnp.einsum("btd,dc->btc", x_BTD, w_DC, preferred_element_type=jnp.float32)


def logits_from_hidden(cfg: ModelConfig, params: dict, x_BTD: jax.Array, mesh=None, rules=None) -> jax.Array:
    """Float32 logits [B, T, V], with Gemma's final soft-cap; a sequence classifier's per-token scores
    [B, T, num_labels] (`score_from_hidden`)."""
    if cfg.num_labels:
        return score_from_hidden(cfg, params, x_BTD)
    w_DV = unembed_matrix(cfg, params).astype(x_BTD.dtype)
    logits = jnp.einsum("btd,dv->btv", x_BTD, w_DV, preferred_element_type=jnp.float32)
    logits = mesh_lib.constrain(logits, ("act_batch", "act_len", "act_vocab"), mesh, rules)
    if cfg.final_softcap is not None:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits


def target_logprobs(cfg: ModelConfig, params: dict, hidden_BTD: jax.Array, targets_BT: jax.Array, *,
                    mesh: Mesh | None = None, temperature: float = 1.0, return_entropy: bool = False):
    """log p(target) [B, T] float32 (and the entropy [B, T]) through the fused `token_logprobs` kernel.

    The one place every loss gets its log-probs: [B, T, V] logits are never formed. On a mesh with a
    Pallas backend the kernel runs under shard_map (tokens over data/fsdp, vocab over tensor when it
    divides); `cfg.logprob_impl="auto"` picks the backend from the mesh's devices.
    """
    B, T, D = hidden_BTD.shape
    h_ND, t_N, w_DV = hidden_BTD.reshape(B * T, D), targets_BT.reshape(B * T), unembed_matrix(cfg, params)
    impl = _resolve_impl(cfg.logprob_impl, mesh)
    kw = dict(temperature=temperature, softcap=cfg.final_softcap, return_entropy=return_entropy, impl=impl)
    if impl.startswith("pallas"):
        kw["interpret"] = cfg.kernel_interpret
    if mesh is None or impl == "xla":
        out = token_logprobs(h_ND, w_DV, t_N, **kw)
    else:
        tensor = mesh.shape.get("tensor", 1)
        vocab_axis = "tensor" if tensor > 1 and w_DV.shape[1] % tensor == 0 else None
        out = token_logprobs_sharded(h_ND, w_DV, t_N, mesh=mesh, vocab_axis=vocab_axis, **kw)
    return jax.tree.map(lambda x: x.reshape(B, T), out)


def layer_groups(cfg: ModelConfig) -> tuple[int, int]:
    """(period, repeats): the layer kinds repeat every `period` layers, `repeats` whole times."""
    L, types = cfg.num_layers, cfg.layer_types
    period = next(p for p in range(1, L + 1) if all(types[i] == types[i % p] for i in range(L)))
    return period, L // period


def _run_layers(cfg, layer, x, layers, cache_kv):
    """Every layer in order; `cache_kv` (k, v: [L, B, S, G, K]) or None is threaded through each one.

    The stacked cache is carried whole (the unrolled chain, or the scan's carry) and each layer writes
    only its new positions into it, so XLA updates one buffer in place instead of copying the cache.
    """
    L, types = cfg.num_layers, cfg.layer_types
    if not cfg.scan_layers:  # cache_kv: per-layer buffers
        for i in range(L):
            kv = None if cache_kv is None else tuple(c[i] for c in cache_kv)
            x, kv = layer(types[i], x, jax.tree.map(lambda a: a[i], layers), kv, i, None)
            if kv is not None:
                cache_kv = tuple(c[:i] + (new,) + c[i + 1:] for c, new in zip(cache_kv, kv))
        return x, cache_kv

    period, repeats = layer_groups(cfg)
    n = period * repeats

    def body(carry, xs):
        x, kv = carry
        p_group, first = xs
        for j in range(period):
            x, kv = layer(types[j], x, jax.tree.map(lambda a: a[j], p_group), kv, first + j, first + j)
        return (x, kv), None

    groups = jax.tree.map(lambda a: a[:n].reshape(repeats, period, *a.shape[1:]), layers)
    firsts = jnp.arange(repeats, dtype=jnp.int32) * period
    (x, cache_kv), _ = jax.lax.scan(body, (x, cache_kv), (groups, firsts))
    for i in range(n, L):
        x, cache_kv = layer(types[i], x, jax.tree.map(lambda a: a[i], layers), cache_kv, i, i)
    return x, cache_kv


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# projection -> (input subscripts, weight input subscripts, weight output subscripts); b, t, n, r are reserved
PROJECTIONS = {
    "q": ("btd", "d", "hk"), "k": ("btd", "d", "gk"), "v": ("btd", "d", "gk"), "o": ("bthk", "hk", "d"),
    "gate": ("btd", "d", "f"), "up": ("btd", "d", "f"), "down": ("btf", "f", "d"),
}
_PROJ_IDS = {name: i for i, name in enumerate(PROJECTIONS)}


def _block(ctx: _Ctx, kind: str, x_BTD, p: dict, cos_sin, kv, rng, *, segments, q_offset, slot):
    """One decoder layer. kv: this layer's cache (k_BGSK, v_BGSK; slot None), or the stacked cache
    (k_LBGSK, v_LBGSK) and this layer's `slot` in it (an int, or a traced scalar under scan), or None;
    rng: LoRA dropout key or None.

    Returns (x, kv), kv with this layer's new keys/values written at q_offset (only those: an update of
    a T-long slice, in place in the carried buffer)."""
    cfg = ctx.cfg
    dtype = x_BTD.dtype

    def w(name, ndim=None):  # parameter in compute dtype, left-padded with 1s to rank `ndim`
        a = p[name].astype(dtype)
        return a if ndim is None else a.reshape((1,) * (ndim - a.ndim) + a.shape)

    def proj(name, x):  # x @ W, plus the LoRA path scale * dropout(x) @ A @ B when adapters exist
        # Over the tokens flattened to one axis n: each weight gradient then contracts one token axis,
        # which XLA:CPU's matmuls read in place; contracting (b, t) made it write transposed copies of
        # the activation gradients first (a quarter of a CPU SFT step's time).
        x_sub, in_sub, out_sub = PROJECTIONS[name]
        n_sub = "n" + x_sub[2:]
        y = jnp.einsum(f"{n_sub},{in_sub}{out_sub}->n{out_sub}", _tokens(x), w(name))
        if f"{name}_lora_a" in p:
            lora = cfg.lora
            if lora.dropout > 0 and rng is not None:
                keep = jax.random.bernoulli(jax.random.fold_in(rng, _PROJ_IDS[name]), 1 - lora.dropout, x.shape)
                x = jnp.where(keep, x / (1 - lora.dropout), 0).astype(x.dtype)
            xa = jnp.einsum(f"{n_sub},{in_sub}r->nr", _tokens(x), w(f"{name}_lora_a"))
            y = y + jnp.einsum(f"nr,r{out_sub}->n{out_sub}", xa, w(f"{name}_lora_b")) * jnp.asarray(
                lora.alpha / lora.rank, dtype)
        return y.reshape(x.shape[:2] + y.shape[1:])

    h = _rms_norm(cfg, x_BTD, p["attn_norm"])
    q, k, v = proj("q", h), proj("k", h), proj("v", h)
    if cfg.qkv_bias:
        q, k, v = q + w("q_bias", 4), k + w("k_bias", 4), v + w("v_bias", 4)
    if cfg.qk_norm:
        q, k = _rms_norm(cfg, q, p["q_norm"]), _rms_norm(cfg, k, p["k_norm"])
    q = rope_lib.apply_rope(q, *cos_sin)
    k = rope_lib.apply_rope(k, *cos_sin)
    q = ctx.constrain(q, "act_batch", "act_len", "act_heads", None)
    k = ctx.constrain(k, "act_batch", "act_len", "act_kv_heads", None)
    v = ctx.constrain(v, "act_batch", "act_len", "act_kv_heads", None)
    impl = None
    if kv is not None:
        lead = () if slot is None else (slot,)
        kv = tuple(jax.lax.dynamic_update_slice(c, new.swapaxes(1, 2)[(None,) * len(lead)].astype(c.dtype),
                                                (*lead, 0, 0, q_offset, 0)) for c, new in zip(kv, (k, v)))
        k, v = (c if slot is None else jax.lax.dynamic_index_in_dim(c, slot, keepdims=False) for c in kv)
        k, v = k.swapaxes(1, 2).astype(dtype), v.swapaxes(1, 2).astype(dtype)
        if q.shape[1] == 1:  # one-token decode: XLA reads the keys in place; a kernel call would copy them out
            impl = "xla"
    a = ctx.attention(q, k, v, impl, causal=True, segment_ids=segments,
                      window=cfg.sliding_window if kind == "sliding" else None, softcap=cfg.attn_softcap,
                      scale=cfg.attn_scale, q_offset=q_offset)
    a = proj("o", a)
    if cfg.o_bias:
        a = a + w("o_bias", 3)
    if cfg.post_norms:
        a = _rms_norm(cfg, a, p["attn_post_norm"])
    x_BTD = ctx.constrain(x_BTD + a, "act_batch", "act_len", "act_embed")

    h = _rms_norm(cfg, x_BTD, p["mlp_norm"])
    g, u = proj("gate", h), proj("up", h)
    if cfg.mlp_bias:
        g, u = g + w("gate_bias", 3), u + w("up_bias", 3)
    m = ctx.constrain(_ACTIVATIONS[cfg.activation](g) * u, "act_batch", "act_len", "act_mlp")
    m = proj("down", m)
    if cfg.mlp_bias:
        m = m + w("down_bias", 3)
    if cfg.post_norms:
        m = _rms_norm(cfg, m, p["mlp_post_norm"])
    return ctx.constrain(x_BTD + m, "act_batch", "act_len", "act_embed"), kv


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


def _tokens(x_BT_):
    """[B, T, ...] -> [B * T, ...]."""
    return x_BT_.reshape((-1,) + x_BT_.shape[2:])


def _rms_norm(cfg: ModelConfig, x, weight):
    """RMSNorm over the last axis, statistics in float32.

    Llama style: w * normed.astype(x.dtype). Gemma style: (normed * (1 + w)) in float32, then cast.
    """
    x32 = x.astype(jnp.float32)
    weight = weight.reshape((1,) * (x.ndim - 1) + weight.shape)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    if cfg.gemma_norm:
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


class Decoder(nnx.Module):
    """A decoder LM as a Flax NNX module: `model(input_ids)` -> float32 logits [B, T, V].

    Parameters live in `model.embed`, `model.final_norm`, `model.lm_head` (untied) and `model.layers`
    (stacked over layers). `nnx.split(model)` gives (graphdef, state) for pure train steps; the pure
    functions of this module take `model.params()` directly.
    """

    def __init__(self, config: ModelConfig, params: dict, *, mesh: Mesh | None = None, rules=None,
                 hf_config: dict | None = None):
        self.config = config
        self.mesh = mesh
        self.rules = None if rules is None else tuple((k, tuple(v)) for k, v in dict(rules).items())
        self.hf_config_json = None if hf_config is None else _dumps(hf_config)
        expected = set(param_specs(config))
        got = set(flatten(params))
        if expected != got:
            raise ValueError(f"Decoder: parameters missing {sorted(expected - got)}, unexpected {sorted(got - expected)}")
        self.embed = nnx.Param(params["embed"])
        self.final_norm = nnx.Param(params["final_norm"])
        if "lm_head" in params:
            self.lm_head = nnx.Param(params["lm_head"])
        if "score" in params:
            self.score = nnx.Param(params["score"])
        self.layers = nnx.Dict({k: nnx.Param(v) for k, v in params["layers"].items()})

    @property
    def rules_dict(self) -> dict | None:
        return None if self.rules is None else dict(self.rules)

    def params(self) -> dict:
        """The parameters as a plain nested dict of arrays (the layout of `init_params`)."""
        out = {"embed": self.embed[...], "final_norm": self.final_norm[...],
               "layers": {k: v[...] for k, v in self.layers.items()}}
        for head in ("lm_head", "score"):
            if hasattr(self, head):
                out[head] = getattr(self, head)[...]
        return out

    def __call__(self, input_ids_BT, positions=None, segment_ids=None, cache: KVCache | None = None):
        """Float32 logits [B, T, V]; with a cache, (logits, updated cache). Compiled once per shape (inside
        an outer `jax.jit` it is inlined; `jax.disable_jit()` runs it op by op for debugging).

        The cache passed in is donated: the new positions are written into its buffers, which the
        returned cache reuses (keep using the returned one)."""
        logits, new_cache = _apply(self.params(), input_ids_BT, positions, segment_ids, cache, cfg=self.config,
                                   mesh=self.mesh, rules=self.rules, with_logits=True)
        return logits if cache is None else (logits, new_cache)

    def hidden_states(self, input_ids_BT, positions=None, segment_ids=None, cache: KVCache | None = None):
        """(final hidden states [B, T, D], cache or None): what `token_logprobs` consumes."""
        return _apply(self.params(), input_ids_BT, positions, segment_ids, cache, cfg=self.config,
                      mesh=self.mesh, rules=self.rules, with_logits=False)

    def unembed(self) -> jax.Array:
        """[D, V] output projection, without computing any logits."""
        return unembed_matrix(self.config, self.params())

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        cache = KVCache.create(self.config, batch, max_len, dtype)
        if self.mesh is None:
            return cache
        put = lambda a, axes: jax.device_put(  # noqa: E731
            a, mesh_lib.named_sharding(self.mesh, axes, a.shape, self.rules_dict))
        return KVCache(*(jax.tree.map(lambda c: put(c, CACHE_AXES[-c.ndim:]), kv) for kv in (cache.k, cache.v)),
                       put(cache.segment_ids, ("act_batch", "cache_len")), cache.index)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "rules", "with_logits"), donate_argnames="cache")
def _apply(params, input_ids_BT, positions, segment_ids, cache, *, cfg, mesh, rules, with_logits):
    """`Decoder.__call__` / `hidden_states` as one compiled program (rules: the hashable tuple form)."""
    rules = None if rules is None else dict(rules)
    x, new_cache = forward_hidden(cfg, params, input_ids_BT, positions, segment_ids, cache, mesh=mesh, rules=rules)
    if with_logits:
        x = logits_from_hidden(cfg, params, x, mesh, rules)
    return x, new_cache


def create(cfg: ModelConfig, seed: int = 0, mesh: Mesh | None = None, rules=None) -> Decoder:
    """A randomly initialised model; with a mesh each parameter is created directly in its shard."""
    key = jax.random.key(seed)
    if mesh is None:
        return Decoder(cfg, init_params(cfg, key))
    rules = None if rules is None else tuple((k, tuple(v)) for k, v in dict(rules).items())
    return Decoder(cfg, _sharded_init(cfg, mesh, rules)(key), mesh=mesh, rules=rules)


@functools.lru_cache(maxsize=16)
def _sharded_init(cfg: ModelConfig, mesh: Mesh, rules: tuple | None):
    """`init_params` jitted once per (config, mesh, rules), the seed traced: a second model of the same
    config in one process (a repeated or resumed run) reuses the compiled initialiser, whose XLA:CPU
    compile takes seconds even for a tiny model (a threefry program per parameter)."""
    shardings = param_shardings(cfg, mesh, None if rules is None else dict(rules))
    return jax.jit(functools.partial(init_params, cfg), out_shardings=shardings)


def _dumps(d: dict) -> str:
    import json

    return json.dumps(d, sort_keys=True, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
