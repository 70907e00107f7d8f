"""Hugging Face checkpoints (config.json + safetensors) <-> sharded polmjax models, exactly.

Loading places every tensor straight into its target sharding: each device's shard is read from the
memory-mapped safetensors file(s) and transformed to our layout, so the whole model never sits on one
host device. Saving streams parameters one at a time into files of at most `max_shard_size` bytes, with
`model.safetensors.index.json` when there is more than one.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from polmjax import mesh as mesh_lib
from polmjax.models.config import ConfigError, ModelConfig, from_hf_config, to_hf_config
from polmjax.models.decoder import Decoder, flatten, param_specs, unflatten
from polmjax.models.safetensors_io import CheckpointError, SafetensorsFile, write_file

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class _Tensor:
    """How one of our parameters maps to HF tensors. `layered`: one HF tensor per layer ({i} in name)."""

    hf_name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    layered: bool = True


def tensor_map(cfg: ModelConfig) -> dict[str, _Tensor]:
    """Our flat parameter name -> HF tensor name and layout transforms, for the parameters cfg has."""
    D, H, G, K = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    same = lambda a: a  # noqa: E731
    t = lambda a: a.T  # noqa: E731

    def heads_in(n):  # HF [n*K, D] -> ours [D, n, K]
        return _Tensor("", lambda a: a.T.reshape(D, n, K), lambda a: a.reshape(D, n * K).T)

    lay = "model.layers.{i}."
    m = {
        "embed": _Tensor("model.embed_tokens.weight", same, same, layered=False),
        "final_norm": _Tensor("model.norm.weight", same, same, layered=False),
        "lm_head": _Tensor("lm_head.weight", t, t, layered=False),
        "score": _Tensor("score.weight", t, t, layered=False),  # HF [num_labels, D], ours [D, num_labels]
        "layers/attn_norm": _Tensor(lay + "input_layernorm.weight", same, same),
        "layers/q": _named(heads_in(H), lay + "self_attn.q_proj.weight"),
        "layers/k": _named(heads_in(G), lay + "self_attn.k_proj.weight"),
        "layers/v": _named(heads_in(G), lay + "self_attn.v_proj.weight"),
        "layers/o": _Tensor(lay + "self_attn.o_proj.weight", lambda a: a.T.reshape(H, K, D),
                            lambda a: a.reshape(H * K, D).T),
        "layers/q_bias": _Tensor(lay + "self_attn.q_proj.bias", lambda a: a.reshape(H, K), lambda a: a.reshape(-1)),
        "layers/k_bias": _Tensor(lay + "self_attn.k_proj.bias", lambda a: a.reshape(G, K), lambda a: a.reshape(-1)),
        "layers/v_bias": _Tensor(lay + "self_attn.v_proj.bias", lambda a: a.reshape(G, K), lambda a: a.reshape(-1)),
        "layers/o_bias": _Tensor(lay + "self_attn.o_proj.bias", same, same),
        "layers/q_norm": _Tensor(lay + "self_attn.q_norm.weight", same, same),
        "layers/k_norm": _Tensor(lay + "self_attn.k_norm.weight", same, same),
        "layers/gate": _Tensor(lay + "mlp.gate_proj.weight", t, t),
        "layers/up": _Tensor(lay + "mlp.up_proj.weight", t, t),
        "layers/down": _Tensor(lay + "mlp.down_proj.weight", t, t),
        "layers/gate_bias": _Tensor(lay + "mlp.gate_proj.bias", same, same),
        "layers/up_bias": _Tensor(lay + "mlp.up_proj.bias", same, same),
        "layers/down_bias": _Tensor(lay + "mlp.down_proj.bias", same, same),
    }
    if cfg.post_norms:  # Gemma: post_attention_layernorm is the attention output norm
        m["layers/attn_post_norm"] = _Tensor(lay + "post_attention_layernorm.weight", same, same)
        m["layers/mlp_norm"] = _Tensor(lay + "pre_feedforward_layernorm.weight", same, same)
        m["layers/mlp_post_norm"] = _Tensor(lay + "post_feedforward_layernorm.weight", same, same)
    else:
        m["layers/mlp_norm"] = _Tensor(lay + "post_attention_layernorm.weight", same, same)
    return {name: m[name] for name in param_specs(cfg.replace(lora=None))}


def _named(t: _Tensor, hf_name: str) -> _Tensor:
    return _Tensor(hf_name, t.to_ours, t.to_hf, t.layered)


# Tensors a checkpoint may carry that do not hold parameters of the model.
_IGNORABLE = re.compile(r".*rotary_emb\.inv_freq$")


def resolve_model_path(path: str | os.PathLike) -> str:
    """A local HF directory for `path`: the directory itself, or a hub repo id downloaded to the HF cache.

    Only config, safetensors and tokenizer files are fetched. Offline (HF_HUB_OFFLINE=1) a repo id must
    already be in the cache.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return path
    if path.count("/") != 1 or path.startswith((".", "/")):
        raise FileNotFoundError(f"{path}: not a model directory (nor a hub repo id like 'Qwen/Qwen3-1.7B')")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"])
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; the message says what to do
        raise FileNotFoundError(
            f"{path}: not a local directory, and downloading it from the hub failed ({type(e).__name__}: {e}); "
            "pass a local HF model directory or go online (HF_HUB_OFFLINE unset)"
        ) from e


def from_pretrained(
    path: str | os.PathLike,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    *,
    compute_dtype=None,
    rules=None,
    lora=None,
    lora_seed: int = 0,
    num_labels: int | None = None,
    head_seed: int = 0,
    **execution,
) -> Decoder:
    """Load an HF model directory into a (sharded) `Decoder`.

    Args:
      path: directory with config.json and model.safetensors (or sharded files + index), or a hub repo id.
      dtype: parameter dtype. compute_dtype: activation dtype (default: dtype).
      mesh: place parameters with the logical-axis rules on this mesh (default: one device).
      lora: a LoraConfig: add fresh adapters (B = 0, so the model is unchanged until trained).
      num_labels: None: the model as saved (a causal LM, or a `*ForSequenceClassification` with its
        head). >= 1 from a causal LM: a sequence classifier / reward model with a NEW `score` head drawn
        as HF does, normal(0, initializer_range) (seed `head_seed`), the LM head dropped. 0: a causal LM.
      execution: other ModelConfig execution fields (remat, scan_layers, attention_impl, ...).
    """
    path = resolve_model_path(path)
    cfg = from_hf_config(
        path, param_dtype=jnp.dtype(dtype).name, compute_dtype=jnp.dtype(compute_dtype or dtype).name, **execution
    )
    with open(os.path.join(path, "config.json")) as f:
        raw_config = json.load(f)
    new_head = num_labels is not None and num_labels != cfg.num_labels
    if new_head and cfg.num_labels:
        raise ConfigError(f"{path} is a sequence classifier with num_labels={cfg.num_labels}; it cannot be loaded "
                          f"with num_labels={num_labels} (start from its causal LM, or use num_labels=None)")
    if new_head:
        cfg = cfg.replace(num_labels=num_labels)
    files = _open_checkpoint(path)
    tmap = tensor_map(cfg)
    _check_tensor_names(cfg, tmap, files, path, new_head=new_head)
    specs = param_specs(cfg)
    flat = {}
    for name, spec in specs.items():
        sharding = (SingleDeviceSharding(jax.devices()[0]) if mesh is None
                    else mesh_lib.named_sharding(mesh, spec.axes, spec.shape, rules))
        if new_head and name == "score":
            flat[name] = _new_head(spec.shape, float(raw_config.get("initializer_range", 0.02)), dtype, sharding,
                                   head_seed)
            continue
        flat[name] = _load_param(cfg, name, spec.shape, tmap[name], files, sharding, jnp.dtype(dtype))
    model = Decoder(cfg, unflatten(flat), mesh=mesh, rules=rules, hf_config=raw_config)
    if lora is not None:
        from polmjax.models.lora import add_adapters

        model = add_adapters(model, lora, seed=lora_seed)
    return model


def save_pretrained(model: Decoder, out_dir: str | os.PathLike, *, max_shard_size: int | str = "5GB",
                    dtype=None) -> None:
    """Write `model` as an HF directory (config.json + safetensors) that `transformers` loads.

    Files above `max_shard_size` bytes are split into model-0000k-of-0000n.safetensors with an index.
    Only process 0 writes; every process must call this (gathering sharded arrays is collective).
    """
    if model.config.lora is not None:
        from polmjax.models.lora import merge

        model = merge(model)  # an HF model directory has no adapters: W + (alpha / r) B A
    cfg = model.config
    out_dir = os.fspath(out_dir)
    dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    limit = _parse_size(max_shard_size)
    base = json.loads(model.hf_config_json) if model.hf_config_json else None
    hf_cfg = to_hf_config(cfg.replace(param_dtype=dtype.name), base)
    tmap = tensor_map(cfg)
    params = flatten(model.params())

    plan = []  # (hf name, shape, dtype, our name, layer or None)
    for name, arr in params.items():
        m = tmap[name]
        if m.layered:
            layer_shape = m.to_hf(np.zeros(arr.shape[1:], np.bool_)).shape
            plan += [(m.hf_name.format(i=i), layer_shape, dtype, name, i) for i in range(arr.shape[0])]
        else:
            plan.append((m.hf_name, m.to_hf(np.zeros(arr.shape, np.bool_)).shape, dtype, name, None))
    files = _split_plan(plan, limit)

    cache: dict[str, np.ndarray] = {}

    def produce(hf_name: str) -> np.ndarray:
        _, _, _, name, layer = by_hf[hf_name]
        if name not in cache:
            cache.clear()  # plan is parameter-major: at most one gathered parameter on the host
            cache[name] = mesh_lib.host_local_array(params[name])
        host = cache[name]
        return np.asarray(tmap[name].to_hf(host if layer is None else host[layer])).astype(dtype)

    by_hf = {p[0]: p for p in plan}
    is_writer = jax.process_index() == 0
    if is_writer:
        os.makedirs(out_dir, exist_ok=True)
        for stale in os.listdir(out_dir):
            if stale.endswith(".safetensors") or stale == INDEX_FILE:
                os.remove(os.path.join(out_dir, stale))
    for fname, entries in files:
        plan_entries = [(p[0], p[1], p[2]) for p in entries]
        if is_writer:
            write_file(os.path.join(out_dir, fname), plan_entries, produce)
        else:  # take part in the collective gathers
            for p in entries:
                produce(p[0])
    if not is_writer:
        return
    if len(files) > 1:
        total = sum(int(np.prod(p[1])) * dtype.itemsize for p in plan)
        index = {"metadata": {"total_size": total}, "weight_map": {p[0]: f for f, es in files for p in es}}
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)


def write_generation_config(out_dir: str | os.PathLike, *, bos_token_id: int | None, eos_token_ids: tuple[int, ...],
                            pad_token_id: int | None, base_dir: str | os.PathLike | None = None) -> None:
    """Token ids into out_dir/config.json, and generation_config.json, so HF tools stop where polmjax does.

    `transformers` `generate` (and vLLM, TGI...) stop at `eos_token_id` of generation_config.json; without
    it a fine-tuned chat model runs past its end-of-turn token. A base model's generation_config.json
    (`base_dir`: sampling defaults such as temperature, top_p) is kept, with the ids set. Process 0 writes.
    """
    if jax.process_index() != 0:
        return
    ids = {"bos_token_id": bos_token_id, "pad_token_id": pad_token_id,
           "eos_token_id": list(eos_token_ids) if len(eos_token_ids) > 1 else
           (eos_token_ids[0] if eos_token_ids else None)}
    ids = {k: v for k, v in ids.items() if v is not None}
    config_path = os.path.join(os.fspath(out_dir), "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(ids)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    generation = {}
    base = None if base_dir is None else os.path.join(os.fspath(base_dir), GENERATION_CONFIG_FILE)
    if base is not None and os.path.exists(base):
        with open(base) as f:
            generation = json.load(f)
    generation.update(ids)
    generation.setdefault("transformers_version", _transformers_version())
    with open(os.path.join(os.fspath(out_dir), GENERATION_CONFIG_FILE), "w") as f:
        json.dump(generation, f, indent=2, sort_keys=True)


GENERATION_CONFIG_FILE = "generation_config.json"


def _transformers_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------------------------


class _Checkpoint:
    """HF tensor name -> the SafetensorsFile holding it (single file or sharded with an index)."""

    def __init__(self, files: dict[str, SafetensorsFile]):
        self.files = files

    def get(self, hf_name: str) -> np.ndarray:
        return self.files[hf_name].get(hf_name)

    def shape(self, hf_name: str) -> tuple[int, ...]:
        return self.files[hf_name].shape(hf_name)

    def where(self, hf_name: str) -> str:
        return self.files[hf_name].path


def _open_checkpoint(path: str) -> _Checkpoint:
    index_path = os.path.join(path, INDEX_FILE)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from e
        opened = {}
        files = {}
        for name, fname in weight_map.items():
            fpath = os.path.join(path, fname)
            if fname not in opened:
                if not os.path.exists(fpath):
                    raise CheckpointError(f"{index_path} lists {fname} (tensor {name!r}) but {fpath} does not exist")
                opened[fname] = SafetensorsFile(fpath)
            if name not in opened[fname].keys():
                raise CheckpointError(f"{index_path} maps tensor {name!r} to {fname}, which does not contain it")
            files[name] = opened[fname]
        return _Checkpoint(files)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(single):
        f = SafetensorsFile(single)
        return _Checkpoint({name: f for name in f.keys()})
    others = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {others}: convert PyTorch pickles to safetensors first)" if others else ""
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _check_tensor_names(cfg: ModelConfig, tmap: dict[str, _Tensor], ckpt: _Checkpoint, path: str, *,
                        new_head: bool = False) -> None:
    """new_head: a causal LM loaded as a sequence classifier (its lm_head is dropped, `score` is new)."""
    expected = set()
    for name, m in tmap.items():
        if new_head and name == "score":
            continue
        expected |= {m.hf_name.format(i=i) for i in range(cfg.num_layers)} if m.layered else {m.hf_name}
    present = set(ckpt.files)
    missing = sorted(expected - present)
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing tensor {missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    tied_head = {"lm_head.weight"} if cfg.tie_embeddings or new_head else set()
    unused = sorted(n for n in present - expected - tied_head if not _IGNORABLE.match(n))
    if unused:
        raise CheckpointError(
            f"{path}: checkpoint tensor {unused[0]!r} ({ckpt.where(unused[0])}) has no place in a {cfg.family} "
            f"model with this config" + (f" ({len(unused) - 1} more)" if len(unused) > 1 else "")
        )


def _new_head(shape, std: float, dtype, sharding, seed: int) -> jax.Array:
    """A fresh `score` head drawn as transformers initialises nn.Linear: normal(0, initializer_range)."""
    init = jax.jit(lambda key: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype),
                   out_shardings=sharding)
    return init(jax.random.key(seed))


def _load_param(cfg, name, shape, m: _Tensor, ckpt: _Checkpoint, sharding, dtype) -> jax.Array:
    np_dtype = np.dtype(dtype)
    layer_shape = shape[1:] if m.layered else shape

    def read(hf_name: str) -> np.ndarray:
        arr = ckpt.get(hf_name)
        expected = m.to_hf(np.zeros(layer_shape, np.bool_)).shape
        if arr.shape != expected:
            raise CheckpointError(
                f"{ckpt.where(hf_name)}: tensor {hf_name!r} has shape {arr.shape}, expected {expected} for "
                f"this config"
            )
        return m.to_ours(arr)

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        if not m.layered:
            return np.asarray(read(m.hf_name)[index]).astype(np_dtype)
        layers = range(cfg.num_layers)[index[0]]
        return np.stack([np.asarray(read(m.hf_name.format(i=i))[index[1:]]).astype(np_dtype) for i in layers])

    return jax.make_array_from_callback(shape, sharding, callback)


def _split_plan(plan: list, limit: int) -> list[tuple[str, list]]:
    groups: list[list] = [[]]
    size = 0
    for p in plan:
        nbytes = int(np.prod(p[1])) * np.dtype(p[2]).itemsize
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += nbytes
    if len(groups) == 1:
        return [(SINGLE_FILE, groups[0])]
    n = len(groups)
    return [(f"model-{k + 1:05d}-of-{n:05d}.safetensors", g) for k, g in enumerate(groups)]


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a string like '5GB', '500MB'")
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(m.group(1)) * units[m.group(2)])
