"""RL prompts (`polmjax.data.prompts`): tokenisation, splits, skipping over-long prompts, exact resume, errors."""

import json

import pytest

from polmjax.data import DataConfig, DataError
from polmjax.data.prompts import PromptSource, tokenize_prompt
from polmjax.data.toy import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def _write(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _rows(n):
    return [{"prompt": [{"role": "user", "content": f"add {i} and {i}"}], "answer": str(2 * i), "id": i}
            for i in range(n)]


def test_prompts_carry_their_fields_and_resume_exactly(tmp_path, tokenizer):
    path = _write(tmp_path / "p.jsonl", _rows(30))
    source = PromptSource(DataConfig(path=path, eval_fraction=0.2), tokenizer, max_prompt_len=64, batch_size=4)
    it = iter(source)
    first = next(it) + it.take(3)
    assert len(first) == 7 and all(p.fields["answer"] == str(2 * p.fields["id"]) for p in first)
    want = tokenizer.apply_chat_template(first[0].prompt, add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(first[0].ids) == want == tokenizer.decode(tokenize_prompt(first[0].prompt, tokenizer))
    state = it.get_state()
    after = [p.fields["id"] for p in it.take(40)]  # across the epoch boundary (24 train prompts)
    again = iter(source)
    again.set_state(json.loads(json.dumps(state)))
    assert [p.fields["id"] for p in again.take(40)] == after
    held_out = [p.fields["id"] for p in iter(PromptSource(DataConfig(path=path, eval_fraction=0.2), tokenizer,
                                                          max_prompt_len=64, split="eval")).take(100)]
    assert len(held_out) == 6 and held_out == sorted(held_out)  # once, in order
    train_ids = {p.fields["id"] for p in iter(source).take(24)}
    assert len(train_ids) == 24 and not train_ids & set(held_out)


def test_long_prompts_are_skipped_and_counted(tmp_path, tokenizer):
    rows = _rows(6)
    rows[2]["prompt"] = "x " * 200
    path = _write(tmp_path / "p.jsonl", rows)
    it = iter(PromptSource(DataConfig(path=path, num_epochs=1), tokenizer, max_prompt_len=32))
    got = it.take(10)
    assert len(got) == 5 and it.skipped == 1 and it.get_state()["skipped"] == 1
    with pytest.raises(DataError, match="every prompt is longer than max_prompt_len=2"):
        iter(PromptSource(DataConfig(path=path), tokenizer, max_prompt_len=2)).take(1)


@pytest.mark.parametrize("row, message", [
    ({"question": "hi"}, r"row 1: field 'prompt' is missing"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "ends with an assistant message"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, tokenizer, row, message):
    path = _write(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError, match=message):
        PromptSource(DataConfig(path=path), tokenizer, max_prompt_len=32)
