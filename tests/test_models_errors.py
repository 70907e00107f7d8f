"""Bad checkpoints and unsupported configs fail with a message naming the file, tensor or field."""

import json
import os

import numpy as np
import pytest
from hf_models import build_hf_model, hf_config

from polmjax import models
from polmjax.models import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build_hf_model("llama").save_pretrained(path)
    return path


def _copy(src, dst):
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        with open(os.path.join(src, f), "rb") as a, open(os.path.join(dst, f), "wb") as b:
            b.write(a.read())
    return dst


def test_truncated_safetensors(saved, tmp_path):
    d = _copy(saved, tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        models.from_pretrained(d)


def test_garbage_header(saved, tmp_path):
    d = _copy(saved, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        models.from_pretrained(d)


def test_missing_weights_file(saved, tmp_path):
    d = _copy(saved, tmp_path / "m")
    os.remove(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        models.from_pretrained(d)


def test_index_points_to_missing_shard(tmp_path):
    hf = build_hf_model("llama")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))[1]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match=f"lists {shard}.*does not exist"):
        models.from_pretrained(tmp_path)


def test_missing_tensor_named(saved, tmp_path):
    from polmjax.models.safetensors_io import SafetensorsFile, write_file

    d = _copy(saved, tmp_path / "m")
    src = SafetensorsFile(saved / "model.safetensors")
    keep = [k for k in src.keys() if k != "model.layers.1.mlp.up_proj.weight"]
    write_file(str(d / "model.safetensors"), [(k, src.shape(k), src.dtype(k)) for k in keep], src.get)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        models.from_pretrained(d)


def test_shape_mismatch_named(saved, tmp_path):
    d = _copy(saved, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight' has shape \(96, 64\), expected \(80, 64\)"):
        models.from_pretrained(d)


def test_unexpected_tensor_named(saved, tmp_path):
    from polmjax.models.safetensors_io import SafetensorsFile, write_file

    d = _copy(saved, tmp_path / "m")
    src = SafetensorsFile(saved / "model.safetensors")
    plan = [(k, src.shape(k), src.dtype(k)) for k in src.keys()] + [("model.extra.weight", (2,), np.dtype("float32"))]
    write_file(str(d / "model.safetensors"), plan, lambda k: np.zeros(2, np.float32) if k == "model.extra.weight" else src.get(k))
    with pytest.raises(CheckpointError, match="'model.extra.weight'.*has no place"):
        models.from_pretrained(d)


@pytest.mark.parametrize("field,value,match", [
    ("hidden_act", "relu", "hidden activation 'relu'"),
    ("attention_dropout", 0.1, "attention_dropout=0.1"),
    ("rope_parameters", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, "rope_type 'dynamic'"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
     "partial_rotary_factor"),
    ("some_new_numerics_knob", 3, "some_new_numerics_knob=3"),
    ("model_type", "gpt2", "model_type 'gpt2'"),
])
def test_unsupported_config_values(saved, tmp_path, field, value, match):
    d = _copy(saved, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        models.from_pretrained(d)


def test_gemma_bidirectional_rejected():
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        models.from_hf_config(hf_config("gemma3", use_bidirectional_attention=True))


def test_config_round_trip():
    from hf_models import CONFIGS

    for name in CONFIGS:
        cfg = models.from_hf_config(hf_config(name))
        import transformers

        again = models.from_hf_config(transformers.AutoConfig.for_model(**models.to_hf_config(cfg)))
        assert again == cfg, name
