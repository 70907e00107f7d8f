"""polmjax.data: formats from every source, assistant masks, packing invariance, sharding, resume, errors."""

import csv
import json
import re

import numpy as np
import pytest

from polmjax.data import (
    DataConfig,
    DataError,
    SFTPipeline,
    assign_bins,
    detect_format,
    load_records,
    tokenize_example,
    tokenize_preference,
    tokenize_unpaired,
    validate_row,
)
from polmjax.data.toy import build_tokenizer, write_toy_preference_dataset, write_toy_sft_dataset

USER, ASSISTANT = "user", "assistant"

# One small row set per format; CSV can hold the string forms only.
ROWS = {
    "text": [{"text": f"the number {i} is here"} for i in range(6)],
    "prompt_completion": [{"prompt": f"add {i} and 1\n", "completion": str(i + 1)} for i in range(6)],
    "messages": [
        {"messages": [{"role": USER, "content": f"add {i} and 2"}, {"role": ASSISTANT, "content": str(i + 2)}]}
        for i in range(6)
    ],
    "preference": [{"prompt": f"add {i} and 3\n", "chosen": str(i + 3), "rejected": str(i + 4)} for i in range(6)],
    "unpaired": [
        {"prompt": f"add {i} and 4\n", "completion": str(i + 4 + i % 2), "label": i % 2 == 0} for i in range(6)
    ],
}
CONVERSATIONAL = {
    "prompt_completion": [
        {"prompt": [{"role": USER, "content": "sort: 3 1 2"}], "completion": [{"role": ASSISTANT, "content": "1 2 3"}]}
    ],
    "preference": [
        {"prompt": [{"role": USER, "content": "add 1 and 1"}], "chosen": [{"role": ASSISTANT, "content": "2"}],
         "rejected": [{"role": ASSISTANT, "content": "3"}]}
    ],
}
CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": USER, "content": "add 23 and 48"},
    {"role": ASSISTANT, "content": "71"},
    {"role": USER, "content": "reverse: a b c"},
    {"role": ASSISTANT, "content": "c b a"},
]


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tok_plain(tmp_path_factory):
    """Same tokenizer, template without {% generation %} markers (incremental masks)."""
    return build_tokenizer(tmp_path_factory.mktemp("tok_plain"), with_generation_markers=False)


@pytest.fixture(scope="session")
def toy_messages(tmp_path_factory):
    return write_toy_sft_dataset(tmp_path_factory.mktemp("toy") / "toy.jsonl", n=60, seed=1)


def write(path, rows, kind):
    """Writes `rows` to `path` as one of jsonl/json/parquet/csv/disk; returns the path to load."""
    path = str(path)
    if kind == "jsonl":
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif kind == "json":
        with open(path, "w") as f:
            json.dump(rows, f)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif kind == "disk":
        import datasets

        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(path)
    return path


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


def documents(batch_list):
    """Every packed document as a tuple of (token, target, mask) triples."""
    docs = []
    for b in batch_list:
        for r in range(b["input_ids"].shape[0]):
            for s in np.unique(b["segment_ids"][r]):
                if s == 0:
                    continue
                sel = b["segment_ids"][r] == s
                docs.append(tuple(zip(b["input_ids"][r][sel].tolist(), b["targets"][r][sel].tolist(),
                                      b["loss_mask"][r][sel].tolist())))
    return docs


def cfg(path, **kw):
    return DataConfig(path=str(path), **kw)


# ---- formats and sources -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "disk"])
def test_every_format_loads_from_every_source(tmp_path, fmt, kind):
    if (fmt, kind) == ("messages", "csv"):
        pytest.skip("CSV cells are strings; conversations need JSON, Parquet or Arrow")
    path = write(tmp_path / f"data.{kind}", ROWS[fmt], kind)
    records = load_records(path)
    assert records.format == fmt
    assert records.rows == [validate_row(r, fmt) for r in ROWS[fmt]]
    assert records.row_numbers == list(range(1, len(ROWS[fmt]) + 1))  # 1-based (JSONL: the line number)
    if fmt in CONVERSATIONAL and kind != "csv":
        path = write(tmp_path / f"conv.{kind}", CONVERSATIONAL[fmt], kind)
        assert load_records(path).rows == [validate_row(r, fmt) for r in CONVERSATIONAL[fmt]]


@pytest.mark.parametrize("fmt", ["text", "prompt_completion", "messages"])
def test_pipeline_runs_every_sft_format(tmp_path, tok, fmt):
    pipe = SFTPipeline(cfg(write(tmp_path / "d.jsonl", ROWS[fmt], "jsonl"), num_epochs=1), tok, global_batch=2, seq_len=32)
    docs = documents(batches(pipe)[0])
    assert len(docs) == 6 and all(any(m for _, _, m in d) for d in docs)
    assert pipe.stats["loss_tokens"] == sum(m for d in docs for _, _, m in d)
    with pytest.raises(DataError, match="not an SFT format"):
        SFTPipeline(cfg(write(tmp_path / "p.jsonl", ROWS["preference"], "jsonl")), tok, global_batch=2, seq_len=32)


def test_format_detection_errors_list_columns():
    assert detect_format(["prompt", "completion", "label", "id"]) == "unpaired"
    assert detect_format(["chosen", "rejected"]) == "preference"
    with pytest.raises(DataError, match=r"columns \[question, response\].*prompt, completion"):
        detect_format(["question", "response"], "x.jsonl")
    with pytest.raises(DataError, match=r"messages, text.*several formats"):
        detect_format(["text", "messages"], "x.jsonl")


BAD_ROWS = {  # format -> (bad row, field named in the error)
    "text": ({"txt": "hello"}, "'text' is missing"),
    "prompt_completion": ({"prompt": "a", "completion": " "}, "'completion' is empty"),
    "messages": ({"messages": [{"role": USER, "content": "hi"}, {"role": "bot", "content": "x"}]},
                 "'messages[1].role' has unknown role 'bot'"),
    "preference": ({"prompt": "a", "chosen": "b"}, "'rejected' is missing"),
    "unpaired": ({"prompt": "a", "completion": "b", "label": "yes"}, "'label' must be a bool"),
}


@pytest.mark.parametrize("fmt", list(BAD_ROWS))
def test_bad_rows_name_file_row_and_field(tmp_path, fmt):
    bad, message = BAD_ROWS[fmt]
    rows = ROWS[fmt][:3] + [bad] + ROWS[fmt][3:]
    path = write(tmp_path / "d.jsonl", rows, "jsonl")
    with pytest.raises(DataError, match=rf"d\.jsonl row 4: field {re.escape(message)}.*format {fmt} expects"):
        load_records(path, format=fmt)
    records = load_records(path, format=fmt, skip_bad_rows=True)
    assert (records.bad_rows, len(records), records.row_numbers[3]) == (1, 6, 5)
    assert "row 4" in records.bad_reasons[0]


def test_more_bad_rows_and_skip_counts(tmp_path, tok):
    lines = [json.dumps(ROWS["messages"][0]), "{not json", json.dumps({"messages": "hi"}),
             json.dumps({"messages": [{"role": USER, "content": "only a question"}]}),
             json.dumps(ROWS["messages"][1])]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"m\.jsonl row 2: not valid JSON"):
        load_records(path, format="messages")
    pipe = SFTPipeline(cfg(path, format="messages", skip_bad_rows=True), tok, global_batch=2, seq_len=32)
    assert pipe.stats["bad_rows"] == 3 and pipe.stats["examples"] == 2
    reasons = " ".join(pipe.stats["bad_row_reasons"])
    assert "row 3: field 'messages' must be a list" in reasons and "row 4: field 'messages' has no assistant" in reasons
    # CSV and Parquet rows are named the same way.
    csv_path = write(tmp_path / "d.csv", ROWS["prompt_completion"][:2] + [{"prompt": "x", "completion": ""}], "csv")
    with pytest.raises(DataError, match=r"d\.csv row 3: field 'completion' is empty"):
        load_records(csv_path)
    pq_path = write(tmp_path / "d.parquet", ROWS["text"][:4] + [{"text": None}], "parquet")
    with pytest.raises(DataError, match=r"d\.parquet row 5: field 'text' is missing"):
        load_records(pq_path)
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        load_records(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match=r"empty\.jsonl: the dataset is empty"):
        load_records(tmp_path / "empty.jsonl", format="text")


def test_rows_that_fail_to_tokenise_are_named_or_skipped(tmp_path, tok):
    import copy

    picky = copy.copy(tok)
    picky.chat_template = (
        "{% if messages[1].content == 'boom' %}{{ raise_exception('no boom') }}{% endif %}" + tok.chat_template
    )
    rows = [{"messages": [{"role": USER, "content": f"hi {i}"}, {"role": ASSISTANT, "content": "boom" if i == 20 else "ok"}]}
            for i in range(30)]
    path = write(tmp_path / "boom.jsonl", rows, "jsonl")
    pipe = SFTPipeline(cfg(path, num_epochs=1, max_rows=25), picky, global_batch=4, seq_len=64)  # row 20 is past the probe
    with pytest.raises(DataError, match=r"boom\.jsonl row 21: cannot tokenise \(TemplateError: no boom\)"):
        batches(pipe)
    pipe = SFTPipeline(cfg(path, num_epochs=1, max_rows=25, skip_bad_rows=True), picky, global_batch=4, seq_len=64)
    assert len(documents(batches(pipe)[0])) == 24
    assert pipe.stats["rows_read"] == 25 and pipe.stats["dropped"]["cannot_tokenise"] == 1


# ---- tokenisation and masks ----------------------------------------------------------------------


def hand_built(tok, segments):
    """ids and train mask from (text, trained) pieces encoded one by one."""
    ids, train = [], []
    for text, trained in segments:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        train += [trained] * len(piece)
    return np.array(ids), np.array(train)


def conversation_segments(trailing_newline_trained):
    nl = trailing_newline_trained
    return [
        ("<s><|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nadd 23 and 48<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("71<|im_end|>", True), ("\n", nl),
        ("<|im_start|>user\nreverse: a b c<|im_end|>\n<|im_start|>assistant\n", False),
        ("c b a<|im_end|>", True), ("\n", nl),
    ]


def test_assistant_mask_with_generation_markers(tok):
    ids, train = tokenize_example({"messages": CONVERSATION}, "messages", tok)
    want_ids, want_train = hand_built(tok, conversation_segments(trailing_newline_trained=False))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(train, want_train)


def test_assistant_mask_by_incremental_templating(tok_plain):
    # Without markers each assistant turn owns everything it adds, up to the next turn.
    ids, train = tokenize_example({"messages": CONVERSATION}, "messages", tok_plain)
    want_ids, want_train = hand_built(tok_plain, conversation_segments(trailing_newline_trained=True))
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(train, want_train)
    _, everything = tokenize_example({"messages": CONVERSATION}, "messages", tok_plain, completion_only_loss=False)
    assert everything.all()


def test_template_that_is_not_prefix_stable_raises(tmp_path, tok_plain):
    import copy

    bad = copy.copy(tok_plain)
    bad.chat_template = (  # hides earlier assistant turns, as reasoning templates do
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}(hidden){% else %}{{ m.content }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(DataError, match=r"not prefix-stable.*generation"):
        tokenize_example({"messages": CONVERSATION}, "messages", bad)


def test_text_and_prompt_completion_bos_eos(tok):
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids, train = tokenize_example({"text": "hello world"}, "text", tok)
    body = tok("hello world", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == [bos] + body + [eos] and train[1:].all()
    ids, train = tokenize_example({"prompt": "add 1 and 2\n", "completion": "3"}, "prompt_completion", tok)
    prompt = tok("add 1 and 2\n", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == [bos] + prompt + [tok.convert_tokens_to_ids("3"), eos]
    assert train.tolist() == [False] * (1 + len(prompt)) + [True, True]
    # A completion that already ends with EOS gets no second one.
    ids, _ = tokenize_example({"prompt": "a", "completion": "3<|im_end|>"}, "prompt_completion", tok)
    assert ids.tolist()[-2:] == [tok.convert_tokens_to_ids("3"), eos]
    # Conversational prompt/completion: loss on exactly what the completion adds.
    row = validate_row(CONVERSATIONAL["prompt_completion"][0], "prompt_completion")
    ids, train = tokenize_example(row, "prompt_completion", tok)
    want_ids, want_train = hand_built(tok, [("<s><|im_start|>user\nsort: 3 1 2<|im_end|>\n<|im_start|>assistant\n", False),
                                            ("1 2 3<|im_end|>\n", True)])
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(train, want_train)


@pytest.mark.parametrize("conversational", [False, True])
def test_tokenize_preference_and_unpaired(tmp_path, tok, conversational):
    path = write_toy_preference_dataset(tmp_path / "p.jsonl", n=8, seed=0, conversational=conversational)
    records = load_records(path)
    assert records.format == "preference"
    for row in records.rows:
        out = tokenize_preference(row, tok, max_len=64)
        assert out["prompt_ids"][0] == tok.bos_token_id
        for key in ("chosen_ids", "rejected_ids"):
            assert tok.eos_token_id in out[key].tolist()
            assert out[key].dtype == np.int32
        assert out["chosen_ids"].tolist() != out["rejected_ids"].tolist()
        short = tokenize_preference(row, tok, max_len=6)
        assert all(len(short["prompt_ids"]) + len(short[k]) <= 6 for k in ("chosen_ids", "rejected_ids"))
        assert short["prompt_ids"][0] == tok.bos_token_id  # left-cut prompt keeps its BOS
    # Implicit prompt: full conversations sharing a prefix give the same ids as the explicit form.
    explicit = CONVERSATIONAL["preference"][0]
    implicit = {k: explicit["prompt"] + explicit[k] for k in ("chosen", "rejected")}
    a, b = tokenize_preference(explicit, tok, 64), tokenize_preference(implicit, tok, 64)
    assert all(a[k].tolist() == b[k].tolist() for k in a)
    out = tokenize_unpaired({"prompt": "add 1 and 1\n", "completion": "2", "label": True}, tok, 64)
    assert out["label"] is True and out["completion_ids"].tolist()[-1] == tok.eos_token_id
    with pytest.raises(DataError, match="'rejected' is identical"):
        tokenize_preference({"prompt": "a", "chosen": "b", "rejected": "b"}, tok, 64)


# ---- packing -------------------------------------------------------------------------------------


def test_assign_bins():
    lengths = [5, 3, 6, 2, 4]
    assert assign_bins(lengths, 10, "none") == [[0], [1], [2], [3], [4]]
    assert assign_bins(lengths, 10, "first_fit") == [[0, 1, 3], [2, 4]]
    assert assign_bins(lengths, 10, "best_fit") == [[2, 4], [0, 1, 3]]  # 6+4, 5+3+2: no waste
    with pytest.raises(ValueError, match="longer than the row"):
        assign_bins([11], 10, "best_fit")


@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
def test_packing_keeps_every_document_intact(toy_messages, tok, packing):
    seq_len = 48
    unpacked, _ = batches(SFTPipeline(cfg(toy_messages, packing="none", num_epochs=1), tok, global_batch=4, seq_len=seq_len))
    pipe = SFTPipeline(cfg(toy_messages, packing=packing, num_epochs=1, pack_buffer=16), tok, global_batch=4, seq_len=seq_len)
    packed, _ = batches(pipe)
    assert sorted(documents(packed)) == sorted(documents(unpacked))
    assert len(documents(packed)) == 60 and len(packed) < len(unpacked)
    assert pipe.stats["fill"] > 0.6
    for b in packed:
        seg, pos, ids, tgt, mask = (b[k] for k in ("segment_ids", "positions", "input_ids", "targets", "loss_mask"))
        for r in range(seg.shape[0]):
            n = int((seg[r] > 0).sum())
            if n == 0:  # a padding row completing the last batch
                assert (ids[r] == tok.pad_token_id).all() and not mask[r].any() and not pos[r].any()
                continue
            s = seg[r][:n]
            assert (seg[r][n:] == 0).all() and s[0] == 1 and set(np.diff(s)) <= {0, 1}  # 1, 2, 3... then padding
            for k in np.unique(s):  # positions restart at 0 for each document
                np.testing.assert_array_equal(pos[r][seg[r] == k], np.arange((seg[r] == k).sum()))
            same = s[1:] == s[:-1]
            assert (tgt[r][: n - 1][same] == ids[r][1:n][same]).all()  # next token of the same document
            last = np.append(~same, True)  # the last token of each document predicts nothing
            assert (tgt[r][:n][last] == 0).all() and (mask[r][:n][last] == 0).all()
            assert (mask[r][n:] == 0).all() and (ids[r][n:] == tok.pad_token_id).all() and (pos[r][n:] == 0).all()


def test_truncation_modes(tmp_path, tok):
    rows = [{"prompt": "sort: " + " ".join("9876543210" * 2) + "\n", "completion": "0 1"}, ROWS["prompt_completion"][0]]
    path = write(tmp_path / "long.jsonl", rows, "jsonl")
    right = SFTPipeline(cfg(path, packing="none", num_epochs=1), tok, global_batch=2, seq_len=16)
    b, _ = batches(right)  # right-cut: the completion is gone, so that example is dropped (no loss)
    assert right.stats["dropped"]["no_loss_tokens"] == 1 and right.stats["examples_truncated"] == 1
    left = SFTPipeline(cfg(path, packing="none", num_epochs=1, truncation="left"), tok, global_batch=2, seq_len=16)
    b, _ = batches(left)
    first = [d for d in documents(b) if len(d) == 16][0]
    assert first[0][0] == tok.bos_token_id and first[-1][0] == tok.eos_token_id  # BOS kept, end kept
    drop = SFTPipeline(cfg(path, packing="none", num_epochs=1, truncation="drop"), tok, global_batch=2, seq_len=16)
    b, _ = batches(drop)
    assert drop.stats["dropped"]["too_long"] == 1 and len(documents(b)) == 1


# ---- determinism, sharding, shapes, resume ----------------------------------------------------------


def test_shapes_dtypes_and_determinism(toy_messages, tok):
    make = lambda seed: SFTPipeline(cfg(toy_messages, seed=seed, num_epochs=2), tok, global_batch=4, seq_len=40)  # noqa: E731
    a, _ = batches(make(0))
    b, _ = batches(make(0))
    c, _ = batches(make(1), n=3)
    dtypes = {"input_ids": np.int32, "targets": np.int32, "loss_mask": np.float32, "positions": np.int32, "segment_ids": np.int32}
    for batch in a:  # the last batch is padded to full size too
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: ((4, 40), d) for k, d in dtypes.items()}
    assert len(a) == len(b) and all((x[k] == y[k]).all() for x, y in zip(a, b) for k in x)
    assert any((x["input_ids"] != y["input_ids"]).any() for x, y in zip(a, c))
    assert len(documents(a)) == 120  # two epochs, each example once per epoch


def test_processes_read_disjoint_parts_of_the_global_batch(toy_messages, tok):
    def rows(batch):
        return [tuple(r) for r in batch["input_ids"].tolist()]

    whole, _ = batches(SFTPipeline(cfg(toy_messages, packing="none"), tok, global_batch=8, seq_len=40), n=10)
    parts = [batches(SFTPipeline(cfg(toy_messages, packing="none"), tok, global_batch=8, seq_len=40,
                                 process_index=p, process_count=2), n=10)[0] for p in range(2)]
    for step in range(10):  # across an epoch boundary (60 examples = 7.5 global batches)
        p0, p1 = rows(parts[0][step]), rows(parts[1][step])
        assert parts[0][step]["input_ids"].shape == (4, 40)
        assert sorted(p0 + p1) == sorted(rows(whole[step])) and not set(p0) & set(p1)
    # Packed: disjoint documents that together are the epoch.
    packed = [documents(batches(SFTPipeline(cfg(toy_messages, num_epochs=1), tok, global_batch=8, seq_len=40,
                                            process_index=p, process_count=2))[0]) for p in range(2)]
    everything, _ = batches(SFTPipeline(cfg(toy_messages, num_epochs=1), tok, global_batch=8, seq_len=40))
    assert sorted(packed[0] + packed[1]) == sorted(documents(everything)) and len(packed[0]) == len(packed[1]) == 30


@pytest.mark.parametrize("packing,k", [("best_fit", 3), ("best_fit", 10), ("best_fit", 12), ("none", 13), ("first_fit", 5)])
def test_resume_equals_uninterrupted_across_epochs(toy_messages, tok, packing, k):
    def make(**kw):
        return SFTPipeline(cfg(toy_messages, packing=packing, pack_buffer=24, **kw), tok, global_batch=4, seq_len=48,
                           process_index=1, process_count=2)

    m = 12
    straight, _ = batches(make(), n=k + m)
    _, it = batches(make(), n=k)
    state = it.get_state()
    resumed, it2 = batches(make(), n=m, state=state)
    assert state["epoch"] < it2.stats["epoch"]  # the m batches cross an epoch boundary
    for x, y in zip(straight[k:], resumed):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    with pytest.raises(DataError, match="seq_len: saved 48, now 32"):
        iter(SFTPipeline(cfg(toy_messages, packing=packing, pack_buffer=24), tok, global_batch=4, seq_len=32,
                         process_index=1, process_count=2)).set_state(state)


def test_resume_of_a_finite_stream_ends_like_the_original(toy_messages, tok):
    make = lambda: SFTPipeline(cfg(toy_messages, num_epochs=2, pack_buffer=16), tok, global_batch=4, seq_len=48)  # noqa: E731
    straight, _ = batches(make())
    k = len(straight) - 2
    _, it = batches(make(), n=k)
    resumed, it2 = batches(make(), state=it.get_state())
    assert len(resumed) == 2 and all((x[key] == y[key]).all() for x, y in zip(straight[k:], resumed) for key in x)
    assert it2.stats["epoch"] == 1 and it2.stats["examples_read"] == 120


def test_eval_split_is_held_out_and_equal_length_on_every_process(toy_messages, tok):
    c = cfg(toy_messages, eval_fraction=0.2, packing="none")
    train = SFTPipeline(c, tok, global_batch=4, seq_len=40)
    evals = [SFTPipeline(c, tok, global_batch=4, seq_len=40, split="eval", process_index=p, process_count=2) for p in range(2)]
    assert len(train.indices) == 48 and not set(train.indices) & set(evals[0].indices)
    counts = [len(batches(e)[0]) for e in evals]
    assert counts == [3, 3]  # 12 examples / global batch 4, same count on both processes
    with pytest.raises(DataError, match="eval_fraction"):
        SFTPipeline(cfg(toy_messages), tok, global_batch=4, seq_len=40, split="eval")
