"""`ModelConfig`: every number that decides a decoder's output, and its mapping to and from HF configs.

A Hugging Face config is read through `transformers.AutoConfig` (so defaults and legacy fields such as
`rope_scaling` resolve exactly as in `transformers`), then every field is either honoured here, known
not to change numerics, or rejected with an error naming it. Nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from polmjax.errors import UserError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
# HF's classifier / reward model: the decoder plus `score` on the last non-pad token (num_labels >= 1)
SEQ_CLS_ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification",
    "gemma3_text": "Gemma3TextForSequenceClassification",
}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(UserError, ValueError):
    """A model config that polmjax cannot honour exactly."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (`rope_parameters` in transformers 5)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None  # llama3, yarn
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn (None: derived from factor / mscale)
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn

    def __post_init__(self):
        if self.type not in ROPE_TYPES:
            raise ConfigError(f"rope_type {self.type!r} is not supported; supported: {ROPE_TYPES}")


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
PEFT_MODULE_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                     "up": "up_proj", "down": "down_proj"}


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (Hu et al., 2021): W x + (alpha / rank) * B A dropout(x), B initialised to 0.

    targets: projections to adapt, by our names (q, k, v, o, gate, up, down) or PEFT names (q_proj, ...).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")

    def __post_init__(self):
        by_peft = {v: k for k, v in PEFT_MODULE_NAMES.items()}
        targets = tuple(by_peft.get(t, t) for t in self.targets)
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad:
            raise ConfigError(f"lora targets {bad} unknown; choose from {LORA_TARGETS} or {tuple(by_peft)}")
        if self.rank < 1 or not 0 <= self.dropout < 1:
            raise ConfigError(f"lora: rank must be >= 1 and 0 <= dropout < 1, got rank={self.rank} "
                              f"dropout={self.dropout}")
        object.__setattr__(self, "targets", targets)


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer. Field names follow the shape legend in `polmjax.models`."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    activation: str = "silu"  # silu | gelu_tanh | gelu
    layer_types: tuple[str, ...] = ()  # per layer: "full" | "sliding"; () = all full
    sliding_window: int | None = None  # keys visible to a query on "sliding" layers, itself included
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_local: RopeConfig | None = None  # rope of "sliding" layers when it differs (Gemma 3)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k (Qwen3, Gemma 3)
    gemma_norm: bool = False  # RMSNorm as x * (1 + w), computed in float32 (Gemma)
    post_norms: bool = False  # norms after attention and MLP too (Gemma 2/3 "sandwich")
    embed_scale: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (Gemma); None: head_dim
    attn_softcap: float | None = None
    final_softcap: float | None = None
    tie_embeddings: bool = False
    max_position_embeddings: int = 8192
    # 0: a causal LM (lm_head / tied unembedding). >= 1: a sequence classifier / reward model as HF's
    # `*ForSequenceClassification`: a `score` head [D, num_labels] (no bias) and no lm_head.
    num_labels: int = 0
    # execution (do not change the function the model computes, up to float rounding)
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False
    attention_impl: str = "auto"  # auto | xla | pallas_tpu | pallas_gpu | cudnn
    logprob_impl: str = "auto"  # auto | xla | pallas_tpu | pallas_gpu
    kernel_interpret: bool = False  # run the Pallas kernels in interpret mode (CPU debugging and tests)
    lora: LoraConfig | None = None  # adapters (the base parameters are then frozen by the trainer)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"model family {self.family!r} is not supported; supported: {FAMILIES}")
        if set(self.layer_types) <= {"full"}:  # () or all-full: nothing but a count, so follow num_layers
            object.__setattr__(self, "layer_types", ("full",) * self.num_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        bad = set(self.layer_types) - {"full", "sliding"}
        if bad:
            raise ConfigError(f"layer_types: unknown kinds {sorted(bad)}; expected 'full' or 'sliding'")
        if "sliding" in self.layer_types and not self.sliding_window:
            raise ConfigError("layer_types has sliding layers but sliding_window is not set")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.activation not in ("silu", "gelu_tanh", "gelu"):
            raise ConfigError(f"activation {self.activation!r} is not supported (silu, gelu_tanh, gelu)")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name}={getattr(self, name)!r}; expected one of {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.num_labels < 0:
            raise ConfigError(f"num_labels={self.num_labels}; expected 0 (causal LM) or >= 1 (sequence classifier)")

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def window_of(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding" else None

    def rope_of(self, layer: int) -> RopeConfig:
        if self.layer_types[layer] == "sliding" and self.rope_local is not None:
            return self.rope_local
        return self.rope

    def num_params(self) -> int:
        D, F, H, G, K, V, L = (self.hidden_size, self.intermediate_size, self.num_heads,
                               self.num_kv_heads, self.head_dim, self.vocab_size, self.num_layers)
        attn = D * K * (H + 2 * G) + H * K * D
        head = self.num_labels * D if self.num_labels else (0 if self.tie_embeddings else V * D)
        return V * D + head + L * (attn + 3 * D * F)


# ----------------------------------------------------------------------------------------------
# Hugging Face config <-> ModelConfig

# Fields that never change what the model computes (ids, bookkeeping, generation defaults).
_NEUTRAL = {
    "architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "torch_dtype", "dtype", "transformers_version", "model_type", "use_cache",
    "initializer_range", "_name_or_path", "name_or_path", "output_hidden_states", "output_attentions",
    "return_dict", "id2label", "label2id", "problem_type", "is_encoder_decoder", "chunk_size_feed_forward",
    "tokenizer_class", "max_position_embeddings", "max_window_layers", "use_sliding_window",
    "_sliding_window_pattern", "sliding_window_pattern", "cache_implementation",
    "pretraining_tp", "prefix", "task_specific_params", "finetuning_task",
    "tie_encoder_decoder", "add_cross_attention", "is_decoder", "cross_attention_hidden_size",
    "attn_implementation", "_attn_implementation", "_attn_implementation_autoset", "_commit_hash",
    "base_model_tp_plan", "base_model_pp_plan", "base_model_ep_plan",
    "output_router_logits", "use_return_dict", "tf_legacy_loss", "pruned_heads", "torchscript",
    "keys_to_ignore_at_inference", "default_theta",
    "typical_p", "temperature", "top_k", "top_p", "do_sample", "num_beams", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "max_length",
    "min_length", "early_stopping", "diversity_penalty", "num_beam_groups", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "encoder_no_repeat_ngram_size", "output_scores",
    "return_dict_in_generate", "bos_token", "eos_token",
}
_HONOURED_COMMON = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "attention_dropout", "head_dim",
    "rope_parameters", "rope_scaling", "rope_theta", "rope_local_base_freq", "hidden_activation",
    "hidden_act", "sliding_window", "layer_types",
}
_HONOURED = {
    "llama": {"attention_bias", "mlp_bias"},
    "mistral": set(),
    "qwen2": set(),
    "qwen3": {"attention_bias"},
    "gemma2": {"attention_bias", "query_pre_attn_scalar", "attn_logit_softcapping",
               "final_logit_softcapping", "use_bidirectional_attention"},
    "gemma3_text": {"attention_bias", "query_pre_attn_scalar", "attn_logit_softcapping",
                    "final_logit_softcapping", "use_bidirectional_attention"},
}


def from_hf_config(hf: Any, **execution) -> ModelConfig:
    """ModelConfig from a `transformers` config object (or a path to a directory / config.json).

    `execution` sets the execution fields (param_dtype, compute_dtype, remat, scan_layers, ...).
    """
    if not hasattr(hf, "to_dict"):
        hf = _load_hf_config(hf)
    d = hf.to_dict()
    family = d.get("model_type")
    if family not in FAMILIES:
        hint = " (use the text model: Gemma3ForCausalLM / model_type gemma3_text)" if family == "gemma3" else ""
        raise ConfigError(f"model_type {family!r} is not supported{hint}; supported: {FAMILIES}")
    _reject_unknown_fields(hf, d, family)
    if d.get("attention_dropout", 0.0):
        raise ConfigError(f"attention_dropout={d['attention_dropout']} is not supported (polmjax has no "
                          "attention dropout); set it to 0.0")
    if d.get("use_bidirectional_attention"):
        raise ConfigError("use_bidirectional_attention=True is not supported (decoder-only causal models)")
    L = d["num_hidden_layers"]
    H = d["num_attention_heads"]
    act_name = d.get("hidden_activation") or d.get("hidden_act")
    if act_name not in ACTIVATIONS:
        raise ConfigError(f"hidden activation {act_name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    layer_types, window = _layer_types(d, family, L)
    seq_cls = any(str(a).endswith("ForSequenceClassification") for a in d.get("architectures") or ())
    rope, rope_local = _rope_configs(hf, d)
    gemma = family.startswith("gemma")
    bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        family=family,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=L,
        num_heads=H,
        num_kv_heads=d.get("num_key_value_heads") or H,
        head_dim=d.get("head_dim") or d["hidden_size"] // H,
        rms_norm_eps=d["rms_norm_eps"],
        activation=ACTIVATIONS[act_name],
        layer_types=layer_types,
        sliding_window=window,
        rope=rope,
        rope_local=rope_local,
        qkv_bias=family == "qwen2" or bias,
        o_bias=bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        qk_norm=family in ("qwen3", "gemma3_text"),
        gemma_norm=gemma,
        post_norms=gemma,
        embed_scale=gemma,
        query_pre_attn_scalar=d.get("query_pre_attn_scalar") if gemma else None,
        attn_softcap=d.get("attn_logit_softcapping") if gemma else None,
        final_softcap=d.get("final_logit_softcapping") if gemma else None,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        max_position_embeddings=d.get("max_position_embeddings") or 8192,
        num_labels=hf.num_labels if seq_cls else 0,
        **execution,
    )


def to_hf_config(cfg: ModelConfig, base: dict | None = None) -> dict:
    """An HF config.json dict for `cfg`; fields of `base` (the loaded config) that we do not own are kept."""
    out = dict(base or {})
    gemma = cfg.family.startswith("gemma")
    layer_types = ["sliding_attention" if t == "sliding" else "full_attention" for t in cfg.layer_types]
    act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[cfg.activation]
    architecture = ARCHITECTURES[cfg.family]
    if cfg.num_labels:  # id2label sets HF's num_labels; a causal-LM base's 2 default labels are replaced
        architecture = SEQ_CLS_ARCHITECTURES[cfg.family]
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
        out.pop("num_labels", None)
    out.update(
        model_type=cfg.family,
        architectures=[architecture],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        attention_dropout=0.0,
        dtype=cfg.param_dtype,
    )
    out.pop("torch_dtype", None)
    out.pop("rope_scaling", None)
    out.pop("rope_theta", None)
    out["hidden_activation" if gemma else "hidden_act"] = act
    if cfg.family in ("llama", "qwen3", "gemma2", "gemma3_text"):
        out["attention_bias"] = cfg.o_bias
    if cfg.family == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    if cfg.family == "mistral":
        out["sliding_window"] = cfg.sliding_window if "sliding" in cfg.layer_types else None
    if cfg.family in ("qwen2", "qwen3"):
        out["layer_types"] = layer_types
        out["use_sliding_window"] = "sliding" in cfg.layer_types
        out["sliding_window"] = cfg.sliding_window
        if out["use_sliding_window"]:
            out["max_window_layers"] = cfg.layer_types.index("sliding")
    if gemma:
        out.update(
            layer_types=layer_types,
            sliding_window=cfg.sliding_window,
            query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
            attn_logit_softcapping=cfg.attn_softcap,
            final_logit_softcapping=cfg.final_softcap,
        )
    if cfg.family == "gemma3_text":
        out["rope_parameters"] = {
            "full_attention": _rope_to_hf(cfg.rope),
            "sliding_attention": _rope_to_hf(cfg.rope_local or cfg.rope),
        }
        out["use_bidirectional_attention"] = False
    else:
        out["rope_parameters"] = _rope_to_hf(cfg.rope)
    return out


def _load_hf_config(path) -> Any:
    import os

    import transformers

    path = os.fspath(path)
    if path.endswith(".json"):
        path = os.path.dirname(path) or "."
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}/config.json is not valid JSON: {e}") from e
    if raw.get("model_type") not in FAMILIES:
        raise ConfigError(f"{path}/config.json: model_type {raw.get('model_type')!r} is not supported; "
                          f"supported: {FAMILIES}")
    return transformers.AutoConfig.from_pretrained(path, local_files_only=True)


def _reject_unknown_fields(hf, d: dict, family: str) -> None:
    """Raise on any field we neither honour nor know to be neutral, unless it has its default value."""
    known = _NEUTRAL | _HONOURED_COMMON | _HONOURED[family]
    unknown = [k for k in d if k not in known]
    if not unknown:
        return
    defaults = type(hf)().to_dict()
    for k in unknown:
        if k in defaults and defaults[k] == d[k]:
            continue
        raise ConfigError(
            f"{family} config field {k}={d[k]!r} changes the model in a way polmjax does not implement; "
            "remove it or use a supported value"
        )


def _layer_types(d: dict, family: str, L: int) -> tuple[tuple[str, ...], int | None]:
    window = d.get("sliding_window")
    if family == "mistral":
        return (("sliding" if window else "full"),) * L, window or None
    hf_types = d.get("layer_types") or ["full_attention"] * L
    if len(hf_types) != L:
        raise ConfigError(f"layer_types has {len(hf_types)} entries for num_hidden_layers={L}")
    mapping = {"full_attention": "full", "sliding_attention": "sliding"}
    bad = [t for t in hf_types if t not in mapping]
    if bad:
        raise ConfigError(f"layer_types entry {bad[0]!r} is not supported (full_attention, sliding_attention)")
    types = tuple(mapping[t] for t in hf_types)
    if "sliding" in types and not window:
        raise ConfigError("layer_types has sliding_attention layers but sliding_window is not set")
    return types, (window if "sliding" in types else None)


def _rope_configs(hf, d: dict) -> tuple[RopeConfig, RopeConfig | None]:
    params = getattr(hf, "rope_parameters", None) or d.get("rope_parameters")
    if params is None:
        raise ConfigError("config has no rope_parameters / rope_theta")
    if "full_attention" in params or "sliding_attention" in params:
        full = _rope_from_hf(params["full_attention"], d)
        local = _rope_from_hf(params.get("sliding_attention", params["full_attention"]), d)
        return full, (local if local != full else None)
    return _rope_from_hf(params, d), None


_ROPE_KEYS = {
    "default": {"rope_type", "rope_theta", "type"},
    "linear": {"rope_type", "rope_theta", "type", "factor"},
    "llama3": {"rope_type", "rope_theta", "type", "factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"},
    "yarn": {"rope_type", "rope_theta", "type", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"},
}


def _rope_from_hf(p: dict, d: dict) -> RopeConfig:
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"rope_type {kind!r} is not supported; supported: {ROPE_TYPES}")
    extra = set(p) - _ROPE_KEYS[kind]
    if "partial_rotary_factor" in extra and p["partial_rotary_factor"] == 1.0:
        extra.discard("partial_rotary_factor")
    if extra:
        raise ConfigError(f"rope_parameters fields {sorted(extra)} are not supported for rope_type {kind!r}")
    kw: dict[str, Any] = {"theta": float(p["rope_theta"]), "type": kind}
    if kind != "default":
        factor = p.get("factor")
        if factor is None and kind == "yarn":
            factor = d["max_position_embeddings"] / p["original_max_position_embeddings"]
        kw["factor"] = float(factor)
    if kind == "llama3":
        kw.update(low_freq_factor=float(p["low_freq_factor"]), high_freq_factor=float(p["high_freq_factor"]),
                  original_max_position_embeddings=int(p["original_max_position_embeddings"]))
    if kind == "yarn":
        kw.update(
            original_max_position_embeddings=int(p["original_max_position_embeddings"]),
            beta_fast=float(p.get("beta_fast") or 32), beta_slow=float(p.get("beta_slow") or 1),
            attention_factor=p.get("attention_factor"), mscale=p.get("mscale"),
            mscale_all_dim=p.get("mscale_all_dim"), truncate=bool(p.get("truncate", True)),
        )
    return RopeConfig(**kw)


def _rope_to_hf(r: RopeConfig) -> dict:
    out: dict[str, Any] = {"rope_type": r.type, "rope_theta": r.theta}
    if r.type != "default":
        out["factor"] = r.factor
    if r.type == "llama3":
        out.update(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
                   original_max_position_embeddings=r.original_max_position_embeddings)
    if r.type == "yarn":
        out.update(original_max_position_embeddings=r.original_max_position_embeddings,
                   beta_fast=r.beta_fast, beta_slow=r.beta_slow, truncate=r.truncate)
        for k in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(r, k) is not None:
                out[k] = getattr(r, k)
    return out


def yarn_attention_factor(r: RopeConfig) -> float:
    """Scale of cos/sin for yarn (transformers `_compute_yarn_parameters`)."""
    if r.attention_factor is not None:
        return float(r.attention_factor)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if r.mscale and r.mscale_all_dim:
        return float(mscale(r.factor, r.mscale) / mscale(r.factor, r.mscale_all_dim))
    return mscale(r.factor)
