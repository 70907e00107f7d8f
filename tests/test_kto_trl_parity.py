"""Whole-model parity with trl.KTOTrainer: same HF weights, tokenizer, chat template, rows, KL pairs and beta.

A tiny random Qwen2 policy and a differently seeded reference, saved as HF directories; six
conversational unpaired rows (system prompts, a multi-turn prompt, completions of 1 to ~20 tokens,
three desirable and three not). polmjax reads them from JSONL through `UnpairedPipeline` (packing
"none", one global batch of 6 rows, kl_pairs for "kto") and runs `kto_step` on the directories loaded
by `models.from_pretrained`; TRL tokenises them its way (`KTOTrainer._prepare_dataset`), builds its KL
completions, collates (`DataCollatorForUnpairedPreference`) and computes the loss and metrics with
`KTOTrainer.compute_loss`. Loss, `kl`, `rewards/*` and `logps/*` must agree to 1e-4.

The same KL pairs. TRL rotates completions by one within each batch of `per_device_train_batch_size`
in dataset order; the pipeline does the same within each chunk of `global_batch` positions of its
shuffled stream. So TRL gets the rows in the order of the pipeline's (shuffled) stream, with a batch
of all six: both pair example i with the completion of example i - 1 (the first with the last), which
the test checks token for token before comparing numbers.
"""

import functools
import json

import jax
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from datasets import Dataset
from hf_models import build_hf_model
from transformers import AutoModelForCausalLM

from polmjax import models
from polmjax.data import DataConfig, UnpairedPipeline, tokenize_unpaired
from polmjax.data.toy import build_tokenizer
from polmjax.train.kto import kto_step, needs_kl
from polmjax.train.state import init_state

BETA = 0.3
SEQ_LEN = 256  # each sequence <= 128 tokens; one example (+ its KL sequence) per row, packing "none"
TOL = 1e-4
METRICS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
WEIGHTS = {"desirable_weight": 1.3, "undesirable_weight": 0.8}


def _u(text):
    return [{"role": "user", "content": text}]


def _a(text):
    return [{"role": "assistant", "content": text}]


ROWS = [
    {"prompt": _u("add 23 and 48"), "completion": _a("71"), "label": True},
    {"prompt": [{"role": "system", "content": "be brief"}, *_u("reverse: a b c")], "completion": _a("a b c d e f g"),
     "label": False},
    {"prompt": _u("sort: 3 1 2"), "completion": _a("1 2 3"), "label": True},
    {"prompt": _u("add 5 and 7") + _a("12") + _u("now add 12 and 30"),
     "completion": _a("I think it is 24, because 12 and 30 make 24"), "label": False},
    {"prompt": _u("reverse: x y z w v u t s"), "completion": _a("s t u v w x y z, read from the end"), "label": True},
    {"prompt": [{"role": "system", "content": "you are a careful calculator"}, *_u("add 100 and 250")],
     "completion": _a("305"), "label": False},
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("kto_trl_parity")
    with open(root / "rows.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in ROWS)
    tok = build_tokenizer(root / "tok")
    dirs = {}
    for name, seed in (("policy", 1), ("reference", 0)):  # seeds with kl > 0: the reference point is not clamped
        dirs[name] = root / name
        build_hf_model("qwen2", seed=seed, vocab_size=len(tok)).save_pretrained(dirs[name])
    policy, reference = (models.from_pretrained(dirs[n]) for n in ("policy", "reference"))
    return root, tok, dirs, policy, reference


def _pipeline_batch(root, tok, loss):
    pipe = UnpairedPipeline(DataConfig(path=str(root / "rows.jsonl"), packing="none", num_epochs=1), tok,
                            global_batch=len(ROWS), seq_len=SEQ_LEN, kl_pairs=needs_kl(loss))
    (batch,) = list(pipe)
    return batch, pipe.examples_per_row


def _stream_order(batch, tok):
    """ROWS index of each batch row (packing "none": row r = position r of the shuffled stream)."""
    full = [tokenize_unpaired(r, tok, 10**6) for r in ROWS]
    by_tokens = {tuple(np.r_[x["prompt_ids"], x["completion_ids"]].tolist()): i for i, x in enumerate(full)}
    return [by_tokens[tuple(batch["input_ids"][r][batch["segment_ids"][r] == 1].tolist())] for r in range(len(ROWS))]


def _trl(root, tok, dirs, rows, loss):
    def load(name):
        return AutoModelForCausalLM.from_pretrained(dirs[name], attn_implementation="eager", dtype=torch.float32)

    args = trl.KTOConfig(output_dir=str(root / f"trl_{loss}"), loss_type=loss, beta=BETA, **WEIGHTS,
                         per_device_train_batch_size=len(rows), learning_rate=0.0, precompute_ref_log_probs=False,
                         max_length=None, use_cpu=True, report_to=[], bf16=False, seed=0)
    trainer = trl.KTOTrainer(model=load("policy"), ref_model=load("reference"), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tok)
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    batch = trainer._prepare_inputs(trainer.data_collator(examples))
    trainer.model.train()
    with torch.no_grad():
        value = trainer.compute_loss(trainer.model, batch)
    return examples, {"loss": float(value), **{k: v[-1] for k, v in trainer._metrics["train"].items()}}


@pytest.mark.parametrize("loss", ["kto", pytest.param("apo_zero_unpaired", marks=pytest.mark.slow)])
def test_first_step_matches_trl(assets, loss):
    root, tok, dirs, policy, reference = assets
    batch, slots = _pipeline_batch(root, tok, loss)
    order = _stream_order(batch, tok)
    assert sorted(order) == list(range(len(ROWS))) and order != list(range(len(ROWS)))  # a shuffled stream
    examples, want = _trl(root, tok, dirs, [ROWS[i] for i in order], loss)

    for r, ex in enumerate(examples):  # the same tokens, and the same KL pairs: row r takes row r - 1's completion
        seg = batch["segment_ids"][r]
        assert batch["input_ids"][r][seg == 1].tolist() == ex["prompt_ids"] + ex["completion_ids"]
        if needs_kl(loss):
            assert ex["KL_completion_ids"] == examples[r - 1]["completion_ids"]
            assert batch["input_ids"][r][seg == 2].tolist() == ex["prompt_ids"] + ex["KL_completion_ids"]

    optimizer = optax.sgd(0.0)
    step = jax.jit(functools.partial(kto_step, model_cfg=policy.config, optimizer=optimizer, loss=loss, beta=BETA,
                                     slots_per_row=slots, **WEIGHTS))
    _, m = step(init_state(policy.params(), optimizer, 0), {"base": {}, "reference": reference.params()}, batch)
    got = {k: float(v) for k, v in m.items()}
    assert got["examples"] == len(ROWS) and got["desirable"] == 3
    assert abs(want["rewards/margins"]) > 1e-2  # a discriminating case
    metrics = METRICS if needs_kl(loss) else tuple(k for k in METRICS if k != "kl")
    if needs_kl(loss):
        assert want["kl"] > 1e-2  # the reference point is not clamped to 0
    diffs = {k: abs(got[k] - want[k]) for k in metrics}
    print(loss, " ".join(f"{k}={v:.1e}" for k, v in diffs.items()))
    for k in metrics:
        assert diffs[k] <= TOL, (k, got[k], want[k])
