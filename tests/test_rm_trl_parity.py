"""Whole-model parity with trl.RewardTrainer: same *ForSequenceClassification checkpoint, tokenizer, chat
template and rows.

A tiny random Qwen2ForSequenceClassification (num_labels=1) saved as an HF directory; six
conversational preference rows (system prompts, a multi-turn prompt, responses of 1 to ~40 tokens).
TRL tokenises and collates them its way (`RewardTrainer._prepare_dataset`: the whole conversation
through the chat template; `DataCollatorForPreference`: chosen then rejected, right-padded with the pad
id) and gives the loss and metrics of one batch of all rows via `compute_loss` (the model pools the
rightmost non-pad token). polmjax reads the same rows from JSONL through `PreferencePipeline` (all
pairs packed into one global batch) and runs a jitted `rm_step` on the directory loaded by
`models.from_pretrained`. Loss, accuracy, margin and mean reward agree to 1e-4: this checks
tokenisation, packing, the pooled position (the last non-pad token), the loss with reward centring, the
loss with a `margin` column (−log σ(r_c − r_r − m), TRL's collator stacking the column per pair) and the
averaging over pairs together.

Tokenizers: the toy ChatML one (pad `<pad>`, EOS = the end of turn `<|im_end|>`); one whose EOS differs
from the end of turn; one without a pad token, where TRL pads with EOS (and so does the pipeline).
"""

import functools
import json

import jax
import optax
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from hf_models import hf_config  # noqa: E402
from polmjax import models  # noqa: E402
from polmjax.data import DataConfig, PreferencePipeline, tokenize_preference  # noqa: E402
from polmjax.data.toy import build_tokenizer  # noqa: E402
from polmjax.train import rm  # noqa: E402
from polmjax.train.state import init_state  # noqa: E402

SEQ_LEN = 256  # 64 pair slots a row: the six pairs fit one global batch of 2 rows
TOL = 1e-4
METRICS = ("loss", "accuracy", "margin", "mean_reward")


def _u(text):
    return [{"role": "user", "content": text}]


def _a(text):
    return [{"role": "assistant", "content": text}]


ROWS = [
    {"prompt": _u("add 23 and 48"), "chosen": _a("71"), "rejected": _a("the answer is 17")},
    {"prompt": [{"role": "system", "content": "be brief"}, *_u("reverse: a b c")], "chosen": _a("c b a"),
     "rejected": _a("a b c d e f g")},
    {"prompt": _u("sort: 3 1 2"), "chosen": _a("1 2 3"), "rejected": _a("3 2 1")},
    {"prompt": _u("add 5 and 7") + _a("12") + _u("now add 12 and 30"), "chosen": _a("42"),
     "rejected": _a("I think it is 24, because 12 and 30 make 24")},
    {"prompt": _u("reverse: x y z w v u t s"),
     "chosen": _a("s t u v w x y z, which is the list read from its end back to its start"),
     "rejected": _a("z")},
    {"prompt": [{"role": "system", "content": "you are a careful calculator"}, *_u("add 100 and 250")],
     "chosen": _a("350"), "rejected": _a("350 is wrong, it is 305")},
]


MARGINS = (0.5, -0.3, 1.0, 0.0, 2.0, -1.5)  # the `margin` column of the margin case, one per row


class _Assets:
    """Per tokenizer variant: the tokenizer, the HF SeqCls directory, the polmjax batch and model, TRL
    trainers per centring coefficient; each built once per module."""

    def __init__(self, root):
        self.root = root
        with open(root / "rows.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in ROWS)
        with open(root / "rows_margin.jsonl", "w") as f:
            f.writelines(json.dumps(r | {"margin": m}) + "\n" for r, m in zip(ROWS, MARGINS, strict=True))

    @functools.cache
    def tokenizer(self, variant):
        tok = build_tokenizer(self.root / f"tok_{variant}")
        if variant == "eos_differs_from_end_of_turn":
            tok.add_special_tokens({"eos_token": "<|endoftext|>"})  # a new id; turns still end with <|im_end|>
        elif variant == "no_pad_token":
            tok.pad_token = None  # TRL pads with EOS and tells the model so
        return tok

    @functools.cache
    def model_dir(self, variant):
        import transformers

        path = self.root / f"{variant}_rm"
        torch.manual_seed(0)
        config = hf_config("qwen2", num_labels=1, vocab_size=len(self.tokenizer(variant)), pad_token_id=0)
        model = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
            model.score.weight.mul_(20.0)  # rewards of order 1: accuracy and margin discriminate
        model.save_pretrained(path)
        return path

    @functools.cache
    def polmjax_inputs(self, variant, margins=False):
        rows = self.root / ("rows_margin.jsonl" if margins else "rows.jsonl")
        pipe = PreferencePipeline(DataConfig(path=str(rows), num_epochs=1), self.tokenizer(variant), global_batch=2,
                                  seq_len=SEQ_LEN)
        (batch,) = list(pipe)  # one global batch: the metrics are means over the same six pairs as TRL's
        keys = (*rm.BATCH_KEYS, rm.MARGIN_KEY) if margins else rm.BATCH_KEYS
        return {k: batch[k] for k in keys}, pipe.pairs_per_row, models.from_pretrained(self.model_dir(variant))

    @functools.cache
    def trainer(self, variant, center_rewards_coefficient=None, margins=False):
        from datasets import Dataset
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(self.model_dir(variant), attn_implementation="eager",
                                                                   dtype=torch.float32)
        args = trl.RewardConfig(output_dir=str(self.root / f"trl_{variant}_{center_rewards_coefficient}_{margins}"),
                                per_device_train_batch_size=len(ROWS), learning_rate=0.0, max_length=None,
                                center_rewards_coefficient=center_rewards_coefficient, use_cpu=True, report_to=[],
                                bf16=False, seed=0)
        rows = [r | {"margin": m} for r, m in zip(ROWS, MARGINS, strict=True)] if margins else ROWS
        return trl.RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=self.tokenizer(variant))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return _Assets(tmp_path_factory.mktemp("rm_trl_parity"))


def _trl_metrics(trainer):
    """RewardTrainer's loss and logged metrics on one batch of all the rows."""
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))]))
    assert ("margin" in batch) == ("margin" in trainer.train_dataset.column_names)
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return {"loss": float(loss), **{k: v[-1] for k, v in trainer._metrics["train"].items()}}


def _polmjax_metrics(inputs, tokenizer, center_rewards_coefficient):
    batch, pairs_per_row, model = inputs
    optimizer = optax.sgd(0.0)  # the metrics are computed before the update anyway
    step = jax.jit(functools.partial(rm.rm_step, model_cfg=model.config, optimizer=optimizer,
                                     pairs_per_row=pairs_per_row, pad_id=rm.reward_pad_id(tokenizer),
                                     center_rewards_coefficient=center_rewards_coefficient))
    _, m = step(init_state(model.params(), optimizer, 0), {}, batch)
    return {k: float(v) for k, v in m.items()}


VARIANTS = ("toy", "eos_differs_from_end_of_turn", "no_pad_token")


@pytest.mark.parametrize("variant", VARIANTS)
def test_tokenisation_matches_trl(assets, variant):
    """TRL's chosen / rejected ids are exactly prompt + response of tokenize_preference (what the pipeline packs)."""
    tok, dataset = assets.tokenizer(variant), assets.trainer(variant).train_dataset
    for i, row in enumerate(ROWS):
        ours = tokenize_preference(row, tok, max_len=10**6)
        for key in ("chosen", "rejected"):
            want = list(dataset[i][f"{key}_ids"])
            assert list(ours["prompt_ids"]) + list(ours[f"{key}_ids"]) == want, (i, key, tok.decode(want))


@pytest.mark.parametrize("variant, center_rewards_coefficient, margins", [
    ("toy", None, False), ("toy", 0.1, False), ("toy", 0.1, True),
    pytest.param("eos_differs_from_end_of_turn", None, False, marks=pytest.mark.slow),
    pytest.param("no_pad_token", 0.1, False, marks=pytest.mark.slow)])
def test_first_step_matches_trl(assets, variant, center_rewards_coefficient, margins):
    want = _trl_metrics(assets.trainer(variant, center_rewards_coefficient, margins))
    tok = assets.tokenizer(variant)  # after TRL set its pad token (EOS when it had none), as TRL trains
    got = _polmjax_metrics(assets.polmjax_inputs(variant, margins), tok, center_rewards_coefficient)
    assert got["pairs"] == len(ROWS)
    assert 0.0 < want["accuracy"] < 1.0 and abs(want["margin"]) > 1e-2  # a discriminating case
    diffs = {k: abs(got[k] - want[k]) for k in METRICS}
    print(variant, center_rewards_coefficient, margins, " ".join(f"{k}={v:.1e}" for k, v in diffs.items()))
    for k in METRICS:
        assert diffs[k] <= (1e-5 if margins else TOL), (k, got[k], want[k])
