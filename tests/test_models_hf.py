"""Parity with `transformers` (torch CPU, fp32) for every family, HF round trips, decoding, packing."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from hf_models import CONFIGS, VOCAB, build_hf_model, hf_logits

from polmjax import models

FAMILIES = list(CONFIGS)


@pytest.fixture(scope="module", params=FAMILIES)
def hf_dir(request, tmp_path_factory):
    model = build_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, str(path)


def _ids(batch=2, length=40, seed=0):
    return np.random.RandomState(seed).randint(3, VOCAB, (batch, length))


def test_logits_match_transformers(hf_dir):
    name, hf, path = hf_dir
    model = models.from_pretrained(path)
    ids = _ids()
    ours = np.asarray(jax.jit(lambda m, x: m(x))(model, ids))
    np.testing.assert_allclose(ours, hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_right_padding_matches_transformers(hf_dir):
    name, hf, path = hf_dir
    model = models.from_pretrained(path)
    ids = _ids(length=24)
    mask = np.ones_like(ids)
    mask[0, 17:] = 0  # row 0 is right-padded
    ids[0, 17:] = 0
    ref = hf_logits(hf, ids, mask)
    ours = np.asarray(model(ids))
    np.testing.assert_allclose(ours[0, :17], ref[0, :17], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours[1], ref[1], atol=1e-4, rtol=0)


def test_save_reload_in_transformers_and_bit_exact(hf_dir, tmp_path):
    name, hf, path = hf_dir
    model = models.from_pretrained(path)
    models.save_pretrained(model, tmp_path / "out")
    again = models.from_pretrained(tmp_path / "out")
    for a, b in zip(jax.tree.leaves(model.params()), jax.tree.leaves(again.params())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ids = _ids(length=16)
    np.testing.assert_allclose(hf_logits(reloaded.float(), ids), hf_logits(hf, ids), atol=1e-5, rtol=0)


def test_cached_decode_equals_full_forward(hf_dir):
    name, hf, path = hf_dir
    model = models.from_pretrained(path)
    ids = _ids(length=14)
    full = np.asarray(model(ids))
    cache = model.init_cache(batch=2, max_len=20)
    prefill = 6
    step = jax.jit(lambda m, x, c: m(x, cache=c))
    logits, cache = step(model, ids[:, :prefill], cache)
    got = [np.asarray(logits)]
    for t in range(prefill, ids.shape[1]):
        logits, cache = step(model, ids[:, t:t + 1], cache)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-5, rtol=0)
    assert int(cache.index) == ids.shape[1]


def test_packed_equals_separate(hf_dir):
    name, hf, path = hf_dir
    model = models.from_pretrained(path)
    docs = [_ids(1, n, seed=n)[0] for n in (7, 11, 5)]
    packed = np.concatenate(docs)[None]
    segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])[None]
    positions = np.concatenate([np.arange(len(d)) for d in docs])[None]
    out = np.asarray(model(packed, positions=positions, segment_ids=segments))
    # each document alone in its own row, right-padded (which the causal model never attends to): one forward
    alone = np.zeros((len(docs), max(map(len, docs))), np.int64)
    for i, d in enumerate(docs):
        alone[i, :len(d)] = d
    alone = np.asarray(model(alone))
    start = 0
    for i, d in enumerate(docs):
        np.testing.assert_allclose(out[:, start:start + len(d)], alone[i:i + 1, :len(d)], atol=1e-5, rtol=0)
        start += len(d)


@pytest.mark.parametrize("name", ["gemma3", "llama"])
def test_scan_and_remat_equal_unrolled(name, tmp_path):
    build_hf_model(name).save_pretrained(tmp_path)
    ids = _ids(length=12)

    def logits_and_grad(model):  # one compiled program per execution setting: forward and backward
        def loss(p):
            logits = _with(model, p)(ids)
            return jnp.mean(logits**2), logits

        (_, logits), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(model.params())
        return np.asarray(logits), grad

    ref, ref_grad = logits_and_grad(models.from_pretrained(tmp_path))
    for execution in (dict(scan_layers=True), dict(remat="full"), dict(scan_layers=True, remat="dots")):
        logits, grad = logits_and_grad(models.from_pretrained(tmp_path, **execution))
        np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0, err_msg=str(execution))
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-4)


def test_scan_cached_decode(tmp_path):
    build_hf_model("gemma3", num_hidden_layers=5,
                   layer_types=["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]).save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path, scan_layers=True)
    ids = _ids(length=9)
    full = np.asarray(model(ids))
    logits, cache = model(ids[:, :4], cache=model.init_cache(2, 12))
    got = [np.asarray(logits)]
    for t in range(4, 9):
        logits, cache = model(ids[:, t:t + 1], cache=cache)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-5, rtol=0)


def test_sharded_checkpoint_files_and_index(tmp_path):
    hf = build_hf_model("qwen3")
    hf.save_pretrained(tmp_path / "hf")
    model = models.from_pretrained(tmp_path / "hf")
    models.save_pretrained(model, tmp_path / "out", max_shard_size="40KB")
    files = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ids = _ids(length=10)
    np.testing.assert_allclose(hf_logits(reloaded, ids), hf_logits(hf, ids), atol=1e-5, rtol=0)
    ours = models.from_pretrained(tmp_path / "out")  # and our own loader reads the sharded layout
    np.testing.assert_allclose(np.asarray(ours(ids)), hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_bf16_params_and_compute(tmp_path):
    hf = build_hf_model("llama")
    hf.save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(model.params()))
    ids = _ids(length=16)
    ref = hf_logits(hf.to(dtype=__import__("torch").bfloat16), ids)
    np.testing.assert_allclose(np.asarray(model(ids)), ref, atol=0.05, rtol=0)
    mixed = models.from_pretrained(tmp_path, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
    assert mixed.embed[...].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(mixed(ids)), ref, atol=0.05, rtol=0)


def test_hidden_states_and_unembed_give_logits(tmp_path):
    build_hf_model("gemma2").save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path)
    ids = _ids(length=8)
    hidden, _ = model.hidden_states(ids)
    w = model.unembed()
    assert hidden.shape == (2, 8, 64) and w.shape == (64, VOCAB)
    cap = model.config.final_softcap
    logits = cap * np.tanh(np.einsum("btd,dv->btv", np.asarray(hidden), np.asarray(w)) / cap)
    np.testing.assert_allclose(logits, np.asarray(model(ids)), atol=1e-5, rtol=0)


def _with(model, params):
    return models.Decoder(model.config, params, mesh=model.mesh)
