"""Whole-model parity with trl.DPOTrainer: same HF weights, tokenizer, chat template, rows and beta.

A tiny random Qwen2 policy and a differently seeded reference, saved as HF directories; six
conversational preference rows (system prompts, a multi-turn prompt, responses of 1 to ~40 tokens).
TRL tokenises and collates them its way (`DPOTrainer._prepare_dataset`, `DataCollatorForPreference`)
and computes the batch's loss and metrics with `DPOTrainer.compute_loss`; polmjax reads the same rows
from JSONL through `PreferencePipeline` (all pairs packed into one global batch) and runs `dpo_step`
on the directories loaded by `models.from_pretrained`. The loss and every `rewards/*` and `logps/*`
metric must agree to 1e-4: this checks tokenisation (prompt/response boundary, the template's end of
turn and trailing newline, BOS and EOS), masks, per-sequence log-prob sums, the loss and the averaging
over pairs together.

Tokenizers: the toy ChatML tokenizer (EOS = its end of turn `<|im_end|>`, the template writes BOS),
and two variants where TRL and an "always BOS, always EOS" rule part ways: EOS differs from the end of
turn (as in Llama 3 or Qwen base tokenizers), and a tokenizer with a BOS that its template does not
write. TRL uses exactly the template's tokens; so does polmjax for conversations (data/tokenize.py).

Not covered here, by design: TRL 1.16's DPOTrainer has no reference-free loss (SimPO is CPOTrainer's,
ORPO ORPOTrainer's; their loss functions are compared with TRL in test_preference_losses.py). RPO's
NLL term is checked as TRL's `loss_type=["sigmoid", "sft"]` against polmjax's `nll_weight`.
"""

import functools
import json

import jax
import optax
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

from datasets import Dataset
from hf_models import build_hf_model
from transformers import AutoModelForCausalLM

from polmjax import models
from polmjax.data import DataConfig, PreferencePipeline, tokenize_preference
from polmjax.data.toy import build_tokenizer
from polmjax.train.dpo import dpo_step
from polmjax.train.state import init_state

BETA = 0.3
SEQ_LEN = 256  # 64 pair slots a row: the six pairs fit one global batch of 2 rows
TOL = 1e-4
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
TOKENIZERS = ("toy", "eos_differs_from_end_of_turn", "template_without_bos")


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


class _Assets:
    """Per tokenizer variant: tokenizer, HF policy/reference dirs, the polmjax batch and models, TRL
    trainers per loss; each built once per module."""

    def __init__(self, root):
        self.root, self._built = root, {}
        with open(root / "rows.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in ROWS)

    def _once(self, key, build):
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]

    def tokenizer(self, variant):
        def build():
            tok = build_tokenizer(self.root / f"tok_{variant}")
            if variant == "eos_differs_from_end_of_turn":
                tok.add_special_tokens({"eos_token": "<|endoftext|>"})  # a new id; turns still end with <|im_end|>
            elif variant == "template_without_bos":
                tok.chat_template = tok.chat_template.replace("{{ bos_token }}", "")
            return tok

        return self._once(("tokenizer", variant), build)

    def model_dir(self, variant, name):
        def build():
            path = self.root / f"{variant}_{name}"
            build_hf_model("qwen2", seed={"policy": 0, "reference": 1}[name],
                           vocab_size=len(self.tokenizer(variant))).save_pretrained(path)
            return path

        return self._once(("model_dir", variant, name), build)

    def polmjax_inputs(self, variant):
        def build():
            pipe = PreferencePipeline(DataConfig(path=str(self.root / "rows.jsonl"), num_epochs=1),
                                      self.tokenizer(variant), global_batch=2, seq_len=SEQ_LEN)
            (batch,) = list(pipe)  # one global batch: the metrics are means over the same six pairs as TRL's
            policy, reference = (models.from_pretrained(self.model_dir(variant, n)) for n in ("policy", "reference"))
            return batch, pipe.pairs_per_row, policy, reference

        return self._once(("polmjax", variant), build)

    def trainer(self, variant, loss_type=("sigmoid",), loss_weights=None):
        def load(name):
            return AutoModelForCausalLM.from_pretrained(self.model_dir(variant, name), attn_implementation="eager",
                                                        dtype=torch.float32)

        def build():
            args = trl.DPOConfig(output_dir=str(self.root / f"trl_{variant}_{'_'.join(loss_type)}"),
                                 loss_type=list(loss_type), loss_weights=loss_weights and list(loss_weights),
                                 beta=BETA, per_device_train_batch_size=len(ROWS), learning_rate=0.0,
                                 precompute_ref_log_probs=False, max_length=None, use_cpu=True, report_to=[],
                                 bf16=False, seed=0)
            return trl.DPOTrainer(model=load("policy"), ref_model=load("reference"), args=args,
                                  train_dataset=Dataset.from_list(ROWS), processing_class=self.tokenizer(variant))

        return self._once(("trainer", variant, loss_type, loss_weights), build)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return _Assets(tmp_path_factory.mktemp("dpo_trl_parity"))


def _trl_metrics(trainer):
    """DPOTrainer's loss and logged metrics on one batch of all the rows (dropout is off: disable_dropout)."""
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))]))
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    return {"loss": float(loss), **{k: v[-1] for k, v in trainer._metrics["train"].items()}}


def _polmjax_metrics(inputs, loss, nll_weight):
    batch, pairs_per_row, policy, reference = inputs
    optimizer = optax.sgd(0.0)  # the metrics are computed before the update anyway
    step = jax.jit(functools.partial(dpo_step, model_cfg=policy.config, optimizer=optimizer, loss=loss, beta=BETA,
                                     nll_weight=nll_weight, pairs_per_row=pairs_per_row))
    _, m = step(init_state(policy.params(), optimizer, 0), {"base": {}, "reference": reference.params()}, batch)
    return {k: float(v) for k, v in m.items()}


@pytest.mark.parametrize("variant", TOKENIZERS)
def test_tokenisation_matches_trl(assets, variant):
    """TRL's prompt / chosen / rejected ids are exactly tokenize_preference's (which the pipeline packs)."""
    tok, dataset = assets.tokenizer(variant), assets.trainer(variant).train_dataset
    for i, row in enumerate(ROWS):
        ours = tokenize_preference(row, tok, max_len=10**6)
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert list(ours[key]) == list(dataset[i][key]), (i, key, tok.decode(ours[key]),
                                                               tok.decode(dataset[i][key]))
        assert (ours["prompt_ids"][0] == tok.bos_token_id) == (variant != "template_without_bos")
        assert tok.decode(ours["chosen_ids"]).endswith("<|im_end|>\n")  # the end of turn and the template's newline


def _case(variant, loss_type, nll_weight=0.0, slow=False):
    return pytest.param(variant, loss_type, nll_weight, id=f"{variant}-{'+'.join(loss_type)}",
                        marks=[pytest.mark.slow] if slow else [])


# Each case compiles its own dpo_step (~3-5 s on a CPU core); the tokeniser variants' full runs and RPO are
# slow-marked (their tokens are checked fast by test_tokenisation_matches_trl, their math by the toy cases).
@pytest.mark.parametrize("variant, loss_type, nll_weight", [
    _case("toy", ("sigmoid",)), _case("toy", ("ipo",)), _case("toy", ("hinge",)),
    _case("toy", ("sigmoid", "sft"), 0.5, slow=True),
    _case("eos_differs_from_end_of_turn", ("sigmoid",), slow=True),
    _case("template_without_bos", ("sigmoid",), slow=True)])
def test_first_step_matches_trl(assets, variant, loss_type, nll_weight):
    want = _trl_metrics(assets.trainer(variant, loss_type, (1.0, nll_weight) if nll_weight else None))
    got = _polmjax_metrics(assets.polmjax_inputs(variant), loss_type[0], nll_weight)
    assert got["pairs"] == len(ROWS)
    assert 0.0 < want["rewards/accuracies"] < 1.0 and abs(want["rewards/margins"]) > 1e-2  # a discriminating case
    diffs = {k: abs(got[k] - want[k]) for k in METRICS}
    print(variant, "+".join(loss_type), " ".join(f"{k}={v:.1e}" for k, v in diffs.items()))
    for k in METRICS:
        assert diffs[k] <= TOL, (k, got[k], want[k])
