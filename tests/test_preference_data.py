"""polmjax.data.preference: pair layout, masks, packing invariance of per-pair sums, sharding, resume, errors."""

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest

from polmjax.data import (
    DataConfig,
    DataError,
    PreferencePipeline,
    SFTPipeline,
    UnpairedPipeline,
    load_records,
    pairs_per_row,
    tokenize_preference,
    tokenize_unpaired,
)
from polmjax.data.toy import build_tokenizer, write_toy_preference_dataset
from polmjax.losses.segments import pair_sums, sequence_sums

SCHEMA = {"input_ids": np.int32, "targets": np.int32, "loss_mask": np.float32, "positions": np.int32,
          "segment_ids": np.int32, "pair_ids": np.int32, "is_chosen": np.bool_}
UNPAIRED_SCHEMA = {k: v for k, v in SCHEMA.items() if k not in ("pair_ids", "is_chosen")} | {
    "example_ids": np.int32, "desirable": np.bool_}
SEQ_LEN = 128


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """40 pairs: conversational and plain-string rows mixed, so pair lengths vary."""
    d = tmp_path_factory.mktemp("pref")
    conv = write_toy_preference_dataset(d / "c.jsonl", n=20, seed=3)
    plain = write_toy_preference_dataset(d / "s.jsonl", n=20, seed=4, conversational=False)
    with open(conv) as a, open(plain) as b:
        lines = [x for pair in zip(a, b) for x in pair]
    (d / "pairs.jsonl").write_text("".join(lines))
    return str(d / "pairs.jsonl")


def cfg(path, **kw):
    return DataConfig(path=str(path), **kw)


def pref(path, tok, global_batch=4, seq_len=SEQ_LEN, **kw):
    split = {k: kw.pop(k) for k in ("split", "process_index", "process_count") if k in kw}
    return PreferencePipeline(cfg(path, **kw), tok, global_batch=global_batch, seq_len=seq_len, **split)


def batches(pipe, n=None, state=None):
    it = iter(pipe)
    if state is not None:
        it.set_state(json.loads(json.dumps(state)))
    out = []
    for b in it:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out, it


def segment(b, r, s, key="input_ids"):
    return b[key][r][b["segment_ids"][r] == s]


def pairs_of(batch_list):
    """Every packed pair as (chosen tokens, rejected tokens)."""
    out = []
    for b in batch_list:
        for r in range(b["input_ids"].shape[0]):
            for s in range(1, int(b["segment_ids"][r].max()) + 1, 2):
                out.append((tuple(segment(b, r, s).tolist()), tuple(segment(b, r, s + 1).tolist())))
    return out


def expected_pairs(path, tok, max_len=SEQ_LEN // 2):
    """(prompt + chosen, prompt + rejected) -> prompt length, from tokenize_preference on each row."""
    out = {}
    for row in load_records(path).rows:
        ids = tokenize_preference(row, tok, max_len)
        p = ids["prompt_ids"].tolist()
        out[(tuple(p + ids["chosen_ids"].tolist()), tuple(p + ids["rejected_ids"].tolist()))] = len(p)
    return out


# ---- layout, masks, schema ---------------------------------------------------------------------


def test_pairs_are_two_segments_of_one_row_with_exact_tokens_and_masks(pairs, tok):
    pipe = pref(pairs, tok, num_epochs=1, pack_buffer=16)
    got, _ = batches(pipe)
    want = expected_pairs(pairs, tok)
    assert sorted(pairs_of(got)) == sorted(want)  # every pair once, tokens exactly prompt+chosen / prompt+rejected
    P = pipe.pairs_per_row
    assert P == SEQ_LEN // 4 and pipe.max_pairs == 4 * P
    packed_rows = 0
    for b in got:
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == {k: ((4, SEQ_LEN), d) for k, d in SCHEMA.items()}
        for r in range(4):
            seg = b["segment_ids"][r]
            n_seg = int(seg.max())
            assert n_seg % 2 == 0 and n_seg // 2 <= P
            packed_rows += n_seg > 2
            pad = seg == 0
            assert (b["pair_ids"][r][pad] == -1).all() and not b["is_chosen"][r][pad].any()
            assert not b["loss_mask"][r][pad].any() and (b["input_ids"][r][pad] == tok.pad_token_id).all()
            for k in range(n_seg // 2):
                for s, chosen in ((2 * k + 1, True), (2 * k + 2, False)):
                    ids, tgt, pos = (segment(b, r, s, key) for key in ("input_ids", "targets", "positions"))
                    n = len(ids)
                    assert n <= SEQ_LEN // 2
                    np.testing.assert_array_equal(pos, np.arange(n))  # an independent causal sequence
                    np.testing.assert_array_equal(tgt, np.r_[ids[1:], 0])
                    assert (segment(b, r, s, "is_chosen") == chosen).all()
                    assert (segment(b, r, s, "pair_ids") == r * P + k).all()  # both segments share the slot id
                key = (tuple(segment(b, r, 2 * k + 1).tolist()), tuple(segment(b, r, 2 * k + 2).tolist()))
                n_prompt = want[key]
                for s in (2 * k + 1, 2 * k + 2):  # loss exactly on the targets that are response tokens
                    n = int((seg == s).sum())
                    np.testing.assert_array_equal(segment(b, r, s, "loss_mask"), (np.arange(n) >= n_prompt - 1) & (np.arange(n) < n - 1))
    assert packed_rows > 0  # several pairs share rows
    assert pipe.stats["loss_tokens"] == sum(int(b["loss_mask"].sum()) for b in got)


def test_conversational_pairs_go_through_the_chat_template(tmp_path, tok):
    prompt = [{"role": "user", "content": "add 1 and 1"}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "2"}],
             "rejected": [{"role": "assistant", "content": "3"}]},
            {"chosen": prompt + [{"role": "assistant", "content": "2"}],  # implicit prompt: same tokens
             "rejected": prompt + [{"role": "assistant", "content": "3"}]}]
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got, _ = batches(pref(path, tok, global_batch=2, seq_len=64, num_epochs=1, packing="none"))
    head = "<s><|im_start|>user\nadd 1 and 1<|im_end|>\n<|im_start|>assistant\n"
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    want = (tuple(enc(head + "2<|im_end|>\n")), tuple(enc(head + "3<|im_end|>\n")))
    assert pairs_of(got) == [want, want]
    for b in got:  # the loss is on what the assistant turn adds after the generation prompt
        for s, response in ((1, "2<|im_end|>\n"), (2, "3<|im_end|>\n")):
            assert tok.decode(segment(b, 0, s, "targets")[segment(b, 0, s, "loss_mask") > 0]) == response


def test_truncation_keeps_both_sequences_in_half_a_row(tmp_path, tok):
    long_prompt = "sort: " + " ".join("9876543210" * 3) + "\n"
    rows = [{"prompt": long_prompt, "chosen": "0 1 2 3", "rejected": "3 2 1 0"},
            {"prompt": "add 1 and 2\n", "chosen": "3", "rejected": "4"}]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pipe = pref(path, tok, global_batch=2, seq_len=32, num_epochs=1)
    got, _ = batches(pipe)
    assert sorted(pairs_of(got)) == sorted(expected_pairs(path, tok, max_len=16))
    for c, r in pairs_of(got):
        assert len(c) <= 16 and len(r) <= 16 and c[0] == r[0] == tok.bos_token_id  # left-cut prompt keeps BOS
    assert pipe.stats["examples_truncated"] == 1
    drop = pref(path, tok, global_batch=2, seq_len=32, num_epochs=1, truncation="drop")
    got, _ = batches(drop)
    assert len(pairs_of(got)) == 1 and drop.stats["dropped"]["too_long"] == 1
    with pytest.raises(DataError, match="truncation='left' does not apply to PreferencePipeline"):
        pref(path, tok, truncation="left")
    with pytest.raises(DataError, match="completion_only_loss=False"):
        pref(path, tok, completion_only_loss=False)
    with pytest.raises(DataError, match="seq_len must be >= 4"):
        pref(path, tok, seq_len=3)


# ---- per-sequence sums: the step's view ------------------------------------------------------------


def test_sequence_sums_by_hand():
    values = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]])
    seg = jnp.array([[1, 1, 2, 2, 3, 0], [1, 1, 1, 2, 2, 2]])
    mask = jnp.array([[1, 0, 1, 1, 1, 1], [0, 1, 1, 0, 1, 1]])
    np.testing.assert_array_equal(sequence_sums(values, seg, mask, 4), [[6, 1, 7, 5], [0, 50, 110, 0]])
    chosen, rejected = pair_sums(values, seg, mask, 2)
    np.testing.assert_array_equal(chosen, [[1, 5], [50, 0]])
    np.testing.assert_array_equal(rejected, [[7, 0], [110, 0]])
    np.testing.assert_array_equal(sequence_sums(values, seg, mask, 2), [[6, 1], [0, 50]])  # ids >= 2 dropped


def per_pair_sums(batch_list, P):
    """{pair: (chosen sum, rejected sum, chosen count, rejected count)} of a per-token value, via pair_sums."""
    out = {}
    for b in batch_list:
        value = np.sin(b["input_ids"] * 0.37 + b["positions"] * 0.11) + 0.01 * b["targets"]  # packing-invariant
        c, r = (np.asarray(x) for x in pair_sums(jnp.asarray(value), b["segment_ids"], b["loss_mask"], P))
        nc, nr = (np.asarray(x) for x in pair_sums(jnp.ones(value.shape), b["segment_ids"], b["loss_mask"], P))
        # The global gather by pair_ids gives the same numbers.
        ids = jnp.where(b["pair_ids"] >= 0, b["pair_ids"] * 2 + (~b["is_chosen"]), 2 * P * len(value))
        flat = np.asarray(sequence_sums(jnp.asarray(value).reshape(1, -1), ids.reshape(1, -1),
                                        b["loss_mask"].reshape(1, -1), 2 * P * len(value))).reshape(len(value), P, 2)
        np.testing.assert_allclose(flat[..., 0], c, rtol=1e-6)
        np.testing.assert_allclose(flat[..., 1], r, rtol=1e-6)
        valid = nc > 0
        assert int(valid.sum()) == len(np.unique(b["pair_ids"][b["pair_ids"] >= 0])) and (nr[valid] > 0).all()
        assert not c[~valid].any() and not nr[~valid].any()
        for row, k in zip(*np.nonzero(valid)):
            key = tuple(segment(b, row, 2 * k + 1).tolist())
            out[key] = (c[row, k], r[row, k], nc[row, k], nr[row, k])
    return out


@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
def test_packed_equals_unpacked_per_pair_sums(pairs, tok, packing):
    P = pairs_per_row(SEQ_LEN)
    unpacked, _ = batches(pref(pairs, tok, num_epochs=1, packing="none"))
    packed, _ = batches(pref(pairs, tok, num_epochs=1, packing=packing, pack_buffer=16))
    assert len(packed) < len(unpacked)
    a, b = per_pair_sums(unpacked, P), per_pair_sums(packed, P)
    assert a.keys() == b.keys() and len(a) == 40
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5)


# ---- sharding, resume, eval split ----------------------------------------------------------------------


def test_processes_read_disjoint_parts_of_the_global_batch(pairs, tok):
    def rows(b):
        return [tuple(r) for r in b["input_ids"].tolist()]

    whole, _ = batches(pref(pairs, tok, global_batch=8, packing="none"), n=7)
    parts = [batches(pref(pairs, tok, global_batch=8, packing="none", process_index=p, process_count=2), n=7)[0]
             for p in range(2)]
    P = pairs_per_row(SEQ_LEN)
    for step in range(7):  # across an epoch boundary (40 pairs = 5 global batches)
        p0, p1 = rows(parts[0][step]), rows(parts[1][step])
        assert parts[0][step]["input_ids"].shape == (4, SEQ_LEN)
        assert sorted(p0 + p1) == sorted(rows(whole[step])) and not set(p0) & set(p1)
        ids = [set(parts[p][step]["pair_ids"][parts[p][step]["pair_ids"] >= 0].tolist()) for p in range(2)]
        assert ids[0] == {r * P for r in range(4)} and ids[1] == {r * P for r in range(4, 8)}  # global slot ids
    packed = [pairs_of(batches(pref(pairs, tok, global_batch=8, num_epochs=1, process_index=p, process_count=2))[0])
              for p in range(2)]
    assert sorted(packed[0] + packed[1]) == sorted(expected_pairs(pairs, tok)) and len(packed[0]) == 20


@pytest.mark.parametrize("packing,k", [("best_fit", 1), ("best_fit", 4), ("none", 7), ("first_fit", 3)])
def test_resume_equals_uninterrupted_across_epochs(pairs, tok, packing, k):
    def make(**kw):
        return pref(pairs, tok, packing=packing, pack_buffer=8, process_index=1, process_count=2, **kw)

    m = 6
    straight, _ = batches(make(), n=k + m)
    _, it = batches(make(), n=k)
    state = it.get_state()
    resumed, it2 = batches(make(), n=m, state=state)
    assert state["epoch"] < it2.stats["epoch"]  # the m batches cross an epoch boundary
    assert len(resumed) == m
    for x, y in zip(straight[k:], resumed):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    sft = SFTPipeline(cfg(write_sft(pairs)), tok, global_batch=4, seq_len=SEQ_LEN, process_index=1, process_count=2)
    with pytest.raises(DataError, match="kind: saved 'PreferencePipeline', now 'SFTPipeline'"):
        iter(sft).set_state(state)


def write_sft(pairs_path):
    """The pairs' chosen side as prompt/completion SFT rows (same row count)."""
    path = pairs_path.replace(".jsonl", "_sft.jsonl")
    with open(path, "w") as f:
        for row in load_records(pairs_path).rows:
            prompt = row["prompt"] if isinstance(row["prompt"], str) else "q"
            chosen = row["chosen"] if isinstance(row["chosen"], str) else "a"
            f.write(json.dumps({"prompt": prompt, "completion": chosen}) + "\n")
    return path


def test_eval_split_is_held_out(pairs, tok):
    train = pref(pairs, tok, eval_fraction=0.25, packing="none")
    held = pref(pairs, tok, eval_fraction=0.25, packing="none", split="eval")
    assert len(train.indices) == 30 and len(held.indices) == 10 and not set(train.indices) & set(held.indices)
    got, _ = batches(held)
    assert len(got) == 3 and len(pairs_of(got)) == 10  # read once, in order; the last batch padded
    assert set(pairs_of(got)) <= set(expected_pairs(pairs, tok)) and not set(pairs_of(got)) & set(pairs_of(batches(train, n=8)[0]))


# ---- errors -------------------------------------------------------------------------------------------------


def test_bad_rows_name_file_row_and_field(tmp_path, tok):
    good = [{"prompt": f"add {i} and 3\n", "chosen": str(i + 3), "rejected": str(i + 4)} for i in range(6)]
    lines = [json.dumps(r) for r in good[:2]] + [
        json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}),
        "",  # a blank line still counts: row numbers are line numbers
        json.dumps({"prompt": "a", "chosen": "b"}),
        json.dumps({"prompt": [{"role": "user", "content": "q"}], "chosen": "b", "rejected": "c"}),
    ] + [json.dumps(r) for r in good[2:]]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl row 3: field 'rejected' is identical to 'chosen'"):
        pref(path, tok)
    pipe = pref(path, tok, skip_bad_rows=True, num_epochs=1)
    assert pipe.stats["bad_rows"] == 3 and pipe.stats["examples"] == 6
    reasons = " ".join(pipe.stats["bad_row_reasons"])
    assert "row 5: field 'rejected' is missing" in reasons
    assert "row 6: field 'chosen' is a string but 'prompt' is a list of messages" in reasons
    assert len(pairs_of(batches(pipe)[0])) == 6
    # A row whose template fails is named too, or skipped and counted.
    picky = copy.copy(tok)
    picky.chat_template = "{% if messages[-1].content == 'boom' %}{{ raise_exception('no boom') }}{% endif %}" + tok.chat_template
    conv = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": "ok"}],
             "rejected": [{"role": "assistant", "content": "boom" if i == 20 else "no"}]} for i in range(24)]
    path = tmp_path / "boom.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in conv))
    with pytest.raises(DataError, match=r"boom\.jsonl row 21: cannot tokenise \(TemplateError: no boom\)"):
        batches(pref(path, picky, num_epochs=1))
    pipe = pref(path, picky, num_epochs=1, skip_bad_rows=True)
    assert len(pairs_of(batches(pipe)[0])) == 23 and pipe.stats["dropped"]["cannot_tokenise"] == 1


def test_margin_column_rides_on_both_sequences_of_its_pair(tmp_path, tok):
    """Each pair's margin on all its tokens (0 on padding); packing moves it with the pair; resume keeps it."""
    rows = [{"prompt": f"add {i} and 3\n", "chosen": str(i + 3), "rejected": "x" * (i % 5 + 1), "margin": i / 4}
            for i in range(24)]
    rows[5]["margin"] = 2  # an int is a number too
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_pair = {}
    for r in rows:
        ids = tokenize_preference(r, tok, SEQ_LEN // 2)
        p = ids["prompt_ids"].tolist()
        by_pair[(tuple(p + ids["chosen_ids"].tolist()), tuple(p + ids["rejected_ids"].tolist()))] = float(r["margin"])
    pipe = pref(path, tok, num_epochs=1, pack_buffer=8)
    got, _ = batches(pipe)
    seen = 0
    for b in got:
        assert b["margin"].dtype == np.float32 and (b["margin"][b["segment_ids"] == 0] == 0).all()
        for r in range(4):
            for s in range(1, int(b["segment_ids"][r].max()) + 1, 2):
                want = by_pair[(tuple(segment(b, r, s).tolist()), tuple(segment(b, r, s + 1).tolist()))]
                assert (segment(b, r, s, "margin") == np.float32(want)).all()
                assert (segment(b, r, s + 1, "margin") == np.float32(want)).all()
                seen += 1
    assert seen == 24
    first, it = batches(pref(path, tok, num_epochs=2, pack_buffer=8), n=3)
    rest, _ = batches(pref(path, tok, num_epochs=2, pack_buffer=8), state=it.get_state())
    whole, _ = batches(pref(path, tok, num_epochs=2, pack_buffer=8))
    for a, b in zip(first + rest, whole, strict=True):
        np.testing.assert_array_equal(a["margin"], b["margin"])


def test_margin_absent_or_defaulted_and_missing_rows_named(pairs, tmp_path, tok):
    b = batches(pref(pairs, tok, num_epochs=1), n=1)[0][0]
    assert "margin" not in b  # no column: no margin (DPO's batches)
    pipe = PreferencePipeline(cfg(pairs, num_epochs=1), tok, global_batch=4, seq_len=SEQ_LEN, margin_default=0.0)
    b = batches(pipe, n=1)[0][0]
    assert b["margin"].dtype == np.float32 and not b["margin"].any()  # a reward model's margin-free loss

    rows = [{"prompt": "p", "chosen": f"c{i}", "rejected": "r", "margin": 0.5} for i in range(6)]
    del rows[3]["margin"]
    rows[4]["margin"] = None  # null is missing too
    path = tmp_path / "some.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"some\.jsonl row 4: field 'margin' is missing, but 4 of 6 rows have one"):
        pref(path, tok)
    rows[3]["margin"] = rows[4]["margin"] = "big"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"some\.jsonl row 4: field 'margin' must be a finite number, got 'big'"):
        pref(path, tok)
    csv = tmp_path / "m.csv"
    csv.write_text("prompt,chosen,rejected,margin\np,c1,r,0.25\np,c2,r,\n")
    with pytest.raises(DataError, match=r"m\.csv row 2: field 'margin' is missing, but 1 of 2 rows"):
        pref(csv, tok)
    assert load_records(str(csv)).rows[0]["margin"] == 0.25


def test_each_pipeline_names_the_one_for_other_formats(pairs, tok, tmp_path):
    with pytest.raises(DataError, match="format 'preference' is not an SFT format.*goes to PreferencePipeline"):
        SFTPipeline(cfg(pairs), tok, global_batch=2, seq_len=32)
    with pytest.raises(DataError, match="format 'prompt_completion' is not the preference format.*SFTPipeline"):
        pref(write_sft(pairs), tok)
    unpaired = write_toy_preference_dataset(tmp_path / "u.jsonl", n=4, seed=0, format="unpaired")
    with pytest.raises(DataError, match="format 'unpaired' is not the preference format.*UnpairedPipeline"):
        pref(unpaired, tok)


# ---- unpaired (KTO) and toy data ------------------------------------------------------------------------------


@pytest.mark.parametrize("conversational", [True, False])
def test_unpaired_examples_carry_their_label(tmp_path, tok, conversational):
    path = write_toy_preference_dataset(tmp_path / "u.jsonl", n=24, seed=5, format="unpaired", conversational=conversational)
    records = load_records(path)
    assert records.format == "unpaired" and {r["label"] for r in records.rows} == {True, False}
    want = {}
    for row in records.rows:
        ids = tokenize_unpaired(row, tok, 64)
        want[tuple(ids["prompt_ids"].tolist() + ids["completion_ids"].tolist())] = (len(ids["prompt_ids"]), ids["label"])
    pipe = UnpairedPipeline(cfg(path, num_epochs=1, pack_buffer=8), tok, global_batch=2, seq_len=64,
                            process_index=1, process_count=2)
    got, _ = batches(pipe)
    seen = []
    for b in got:
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == {k: ((1, 64), d) for k, d in UNPAIRED_SCHEMA.items()}
        seg = b["segment_ids"][0]
        assert (b["example_ids"][0][seg == 0] == -1).all() and not b["desirable"][0][seg == 0].any()
        for s in range(1, int(seg.max()) + 1):
            ids = tuple(segment(b, 0, s).tolist())
            n_prompt, label = want[ids]
            n = len(ids)
            assert (segment(b, 0, s, "desirable") == label).all()
            assert (segment(b, 0, s, "example_ids") == 1 * 32 + s - 1).all()  # global row 1, 32 slots a row
            np.testing.assert_array_equal(segment(b, 0, s, "loss_mask"), (np.arange(n) >= n_prompt - 1) & (np.arange(n) < n - 1))
            seen.append(ids)
    assert len(seen) == 12 and len(set(seen)) == 12  # process 1 reads half of the 24 examples


def test_toy_writer_fits_the_algorithm_writer_signature(tmp_path):
    for fmt in ("preference", "unpaired"):
        path = write_toy_preference_dataset(str(tmp_path / f"{fmt}.jsonl"), n=5, seed=1, format=fmt)
        assert load_records(path).format == fmt and len(load_records(path)) == 5
    with pytest.raises(ValueError, match="'preference' or 'unpaired'"):
        write_toy_preference_dataset(str(tmp_path / "x.jsonl"), n=1, seed=0, format="messages")
