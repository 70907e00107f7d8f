"""LoRA adapters: add, split trainable/frozen, merge for HF export, save in the PEFT layout.

Adapters are ordinary entries of the layer parameter dict (`layers/q_lora_a` [L, D, r], `layers/q_lora_b`
[L, r, H, K], ...), float32 whatever the base dtype, so the forward needs no second model type and a
bf16 base stays bf16. The trainer optimises the first part of `split(params)` and keeps the second
(the base) apart. A sequence classifier's `score` head is trained whole next to the adapters, as PEFT
does for its SEQ_CLS task (`modules_to_save`): a reward model's new head must learn.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from polmjax import mesh as mesh_lib
from polmjax.models.config import PEFT_MODULE_NAMES, LoraConfig
from polmjax.models.decoder import PROJECTIONS, Decoder, flatten, init_params, param_specs, unflatten

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# parameters a LoRA run trains whole (PEFT's modules_to_save; our names are HF's module names here)
MODULES_TO_SAVE = ("score",)


def is_adapter(name: str) -> bool:
    return "_lora_" in name


def is_trainable(name: str) -> bool:
    """Whether a LoRA run trains the parameter (a flattened name): an adapter or a module saved whole."""
    return is_adapter(name) or name in MODULES_TO_SAVE


def has_adapters(params: dict) -> bool:
    """Whether a parameter tree holds LoRA adapters (a reference without them runs with lora=None)."""
    return any(is_adapter(k) for k in params.get("layers", {}))


def add_adapters(model: Decoder, lora: LoraConfig, seed: int = 0) -> Decoder:
    """`model` with fresh adapters on lora.targets (A kaiming-uniform, B = 0: the function is unchanged)."""
    if model.config.lora is not None:
        raise ValueError("add_adapters: the model already has LoRA adapters; merge() them first")
    cfg = model.config.replace(lora=lora)
    fresh = flatten(init_params(cfg, jax.random.key(seed), only=is_adapter))
    flat = flatten(model.params())
    specs = param_specs(cfg)
    for name in specs:
        if is_adapter(name):
            value = fresh[name]
            if model.mesh is not None:
                value = jax.device_put(value, mesh_lib.named_sharding(model.mesh, specs[name].axes,
                                                                      value.shape, model.rules_dict))
            flat[name] = value
    return _rebuild(model, cfg, flat)


def split(params: dict) -> tuple[dict, dict]:
    """(trainable, base) of a nested parameter dict: the adapters (and a score head, `MODULES_TO_SAVE`)
    and the frozen rest; `combine` inverts it."""
    flat = flatten(params)
    return (unflatten({k: v for k, v in flat.items() if is_trainable(k)}),
            unflatten({k: v for k, v in flat.items() if not is_trainable(k)}))


def combine(adapters: dict, base: dict) -> dict:
    return unflatten({**flatten(base), **flatten(adapters)})


def merge(model: Decoder) -> Decoder:
    """A model without adapters whose weights are W + (alpha / rank) * A B, in the base dtype."""
    lora = model.config.lora
    if lora is None:
        return model
    flat = flatten(model.params())
    scale = lora.alpha / lora.rank
    for name in lora.targets:
        w = flat[f"layers/{name}"]
        delta = _delta(flat[f"layers/{name}_lora_a"], flat[f"layers/{name}_lora_b"], name)
        flat[f"layers/{name}"] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    flat = {k: v for k, v in flat.items() if not is_adapter(k)}
    return _rebuild(model, model.config.replace(lora=None), flat)


def save_peft_adapter(model: Decoder, out_dir: str, base_model_name_or_path: str = "") -> None:
    """Write adapter_config.json + adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads.

    A sequence classifier's adapter is PEFT's SEQ_CLS task with its trained `score` head saved whole
    (modules_to_save), to load onto the base `*ForSequenceClassification` (whose head it replaces)."""
    from polmjax.models.safetensors_io import write_file

    lora = model.config.lora
    if lora is None:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters")
    cfg = model.config
    flat = flatten(model.params())
    tensors = {}
    for name in lora.targets:
        module = ("self_attn." if name in ("q", "k", "v", "o") else "mlp.") + PEFT_MODULE_NAMES[name]
        a = mesh_lib.host_local_array(flat[f"layers/{name}_lora_a"])  # [L, in..., r]
        b = mesh_lib.host_local_array(flat[f"layers/{name}_lora_b"])  # [L, r, out...]
        for i in range(cfg.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = a[i].reshape(-1, lora.rank).T.astype(np.float32)  # [r, in]
            tensors[f"{prefix}.lora_B.weight"] = b[i].reshape(lora.rank, -1).T.astype(np.float32)  # [out, r]
    saved = [name for name in MODULES_TO_SAVE if name in flat]
    for name in saved:  # score [D, num_labels] -> HF's [num_labels, D], in its own dtype
        tensors[f"base_model.model.{name}.weight"] = mesh_lib.host_local_array(flat[name]).T
    if jax.process_index() != 0:
        return
    os.makedirs(out_dir, exist_ok=True)
    plan = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    write_file(os.path.join(out_dir, ADAPTER_WEIGHTS), plan, tensors.__getitem__)
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if cfg.num_labels else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted(PEFT_MODULE_NAMES[t] for t in lora.targets), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": saved or None, "layers_to_transform": None, "rank_pattern": {},
        "alpha_pattern": {},
    }
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _delta(a, b, name):
    """A B contracted over the rank, shaped like the base weight (without the layer axis)."""
    x_sub, in_sub, out_sub = PROJECTIONS[name]
    return jnp.einsum(f"l{in_sub}r,lr{out_sub}->l{in_sub}{out_sub}", a.astype(jnp.float32), b.astype(jnp.float32))


def _rebuild(model: Decoder, cfg, flat: dict) -> Decoder:
    base = json.loads(model.hf_config_json) if model.hf_config_json else None
    return Decoder(cfg, unflatten(flat), mesh=model.mesh, rules=model.rules_dict, hf_config=base)
