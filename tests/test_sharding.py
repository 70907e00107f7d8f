"""Same numbers on one device and on 8 fake CPU devices under several meshes."""

import jax
import numpy as np
import pytest
from hf_models import build_hf_model
from jax.sharding import PartitionSpec as P

from polmjax import mesh as mesh_lib
from polmjax import models

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3")
    build_hf_model("gemma3", vocab_size=128, num_attention_heads=8, num_key_value_heads=4).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(0).randint(3, 128, (8, 16))


@pytest.fixture(scope="module")
def reference(saved, ids):
    return np.asarray(models.from_pretrained(saved)(ids))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_logits_equal_single_device(saved, ids, reference, shape):
    assert len(jax.devices()) == 8
    mesh = mesh_lib.make_mesh(*shape)
    model = models.from_pretrained(saved, mesh=mesh)
    logits = jax.jit(lambda m, x: m(x))(model, ids)
    np.testing.assert_allclose(np.asarray(logits), reference, atol=1e-5, rtol=0)


def test_parameters_are_really_sharded(saved):
    mesh = mesh_lib.make_mesh(1, 2, 4)
    model = models.from_pretrained(saved, mesh=mesh)
    assert model.layers["q"][...].sharding.spec == P(None, "fsdp", "tensor", None)  # [L, D, H, K]
    assert model.layers["down"][...].sharding.spec == P(None, "tensor", "fsdp")  # [L, F, D]
    assert model.embed[...].sharding.spec == P("tensor", "fsdp")  # [V, D]
    shard = model.layers["gate"][...].addressable_shards[0].data
    assert shard.shape == (4, 32, 24)  # [L, D/2, F/4]


def test_sharded_cached_decode(saved, ids, reference):
    mesh = mesh_lib.make_mesh(2, 1, 4)
    model = models.from_pretrained(saved, mesh=mesh)
    step = jax.jit(lambda m, x, c: m(x, cache=c))
    logits, cache = step(model, ids[:, :10], model.init_cache(8, 16))
    out = [np.asarray(logits)]
    for t in range(10, 16):
        logits, cache = step(model, ids[:, t:t + 1], cache)
        out.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(out, 1), reference, atol=1e-5, rtol=0)


def test_create_sharded_matches_unsharded():
    cfg = models.from_hf_config(build_hf_model("qwen3", vocab_size=128).config)
    mesh = mesh_lib.make_mesh(2, 2, 2)
    a = models.create(cfg, seed=3)
    b = models.create(cfg, seed=3, mesh=mesh)
    for x, y in zip(jax.tree.leaves(a.params()), jax.tree.leaves(b.params())):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=0)  # jit may fuse std * normal
    assert b.layers["q"][...].sharding.spec == P(None, "fsdp", "tensor", None)


def test_make_mesh_fills_and_validates():
    assert dict(mesh_lib.make_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(mesh_lib.make_mesh(data=-1).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    with pytest.raises(ValueError, match="does not fit 8 devices"):
        mesh_lib.make_mesh(data=3, fsdp=-1)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        mesh_lib.make_mesh(data=-1, fsdp=-1)


def test_rules_override_changes_placement(saved):
    mesh = mesh_lib.make_mesh(1, 2, 4)
    rules = dict(mesh_lib.DEFAULT_RULES, mlp=("fsdp",), embed=())
    model = models.from_pretrained(saved, mesh=mesh, rules=rules)
    assert model.layers["gate"][...].sharding.spec == P(None, None, "fsdp")
    logits = model(np.zeros((2, 4), np.int32))
    assert logits.shape == (2, 4, 128)
