"""Cached sampling equals greedy decoding by repeated full forwards; left padding changes nothing."""

import jax
import numpy as np

from polmjax import models
from polmjax.generate import generate, left_pad
from polmjax.mesh import make_mesh

CFG = models.ModelConfig(family="qwen3", vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)


def _greedy_by_full_forward(model, prompt, n, length=16):
    """Greedy tokens, each from a full forward (no cache) of the whole sequence so far. The sequence is
    right-padded to `length`, which the causal model never attends to: one compiled forward for every step."""
    seq = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, length), np.int32)
        padded[0, :len(seq)] = seq
        seq.append(int(np.argmax(np.asarray(model(padded))[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_greedy_matches_full_forward_with_left_padding():
    model = models.create(CFG, seed=0)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [3]]
    ids, mask = left_pad(prompts, pad_id=0)
    tokens, valid = generate(CFG, model.params(), ids, mask, max_new_tokens=6, eos_id=49)
    for i, p in enumerate(prompts):
        expected = _greedy_by_full_forward(model, p, 6)
        got = np.asarray(tokens[i])[np.asarray(valid[i])].tolist()
        assert got == expected[: len(got)]
        assert len(got) == 6 or got[-1] == 49


def test_stops_at_eos_and_pads_after():
    model = models.create(CFG, seed=0)
    ids, mask = left_pad([[5, 6, 7]], pad_id=0)
    free, _ = generate(CFG, model.params(), ids, mask, max_new_tokens=5, eos_id=-1)
    eos = int(free[0, 1])  # make the second greedy token the EOS
    tokens, valid = generate(CFG, model.params(), ids, mask, max_new_tokens=5, eos_id=eos, pad_id=0)
    assert np.asarray(valid[0]).tolist() == [True, True, False, False, False]
    assert np.asarray(tokens[0, 2:]).tolist() == [0, 0, 0]


def test_sampling_is_seeded():
    model = models.create(CFG, seed=0)
    ids, mask = left_pad([[5, 6], [7, 8]], pad_id=0)
    run = lambda s: np.asarray(generate(CFG, model.params(), ids, mask, jax.random.key(s), max_new_tokens=8,  # noqa: E731
                                        eos_id=-1, temperature=1.0, top_k=10)[0])
    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))


def test_scan_layers_and_mesh_generate_the_same_tokens():
    """The cache as one stacked buffer carried by the layer scan, and sharded over a mesh, decodes the same."""
    cfg = CFG.replace(layer_types=("sliding", "full", "sliding"), num_layers=3, sliding_window=3)
    model = models.create(cfg, seed=1)
    ids, mask = left_pad([[5, 6, 7, 8, 9], [11, 12], [3], [4, 4, 4, 4]], pad_id=0)
    ref = generate(cfg, model.params(), ids, mask, max_new_tokens=7, eos_id=-1)[0]
    scanned = generate(cfg.replace(scan_layers=True), model.params(), ids, mask, max_new_tokens=7, eos_id=-1)[0]
    np.testing.assert_array_equal(np.asarray(scanned), np.asarray(ref))
    for shape in [(2, 2, 2), (1, 4, 2)]:
        mesh = make_mesh(*shape)
        sharded = jax.device_put(model.params(), models.param_shardings(cfg, mesh))  # as create(mesh=) lays them out
        got = generate(cfg, sharded, ids, mask, max_new_tokens=7, eos_id=-1, mesh=mesh)[0]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref), err_msg=str(shape))


def test_decoder_call_donates_the_cache():
    """`model(ids, cache=cache)` writes into the cache's buffers: the one passed in is consumed."""
    model = models.create(CFG, seed=0)
    cache = model.init_cache(1, 8)
    _, new = model(np.asarray([[5, 6]]), cache=cache)
    assert all(c.is_deleted() for c in jax.tree.leaves((cache.k, cache.v)))
    assert int(new.index) == 2
