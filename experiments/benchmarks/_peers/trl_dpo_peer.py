"""TRL peer of `dpo_throughput.py`.

--mode trainer: `trl.DPOTrainer.train()` with an explicit reference model (a second load of the shared HF
  directory: the same initial weights, frozen), precompute_ref_log_probs=False (the reference forward runs in
  every step, as in polmjax and tunix), loss_type sigmoid. The data are text rows of a word-level tokenizer over
  the model's vocabulary ("<17>" = token 17), which TRL tokenises back into exactly the benchmark's ids (checked);
  every response ends with token 1, the tokenizer's EOS, so TRL appends nothing. Every step is timed by a
  `TrainerCallback` (start of step i+1 minus start of step i: collation, the policy forward with TRL's fused
  LM head, the reference forward, its metrics, backward, clipping and the optimizer all count; one extra step
  runs last so that no timed interval holds the end-of-training work). Logging, saving, evaluation, progress
  bars and reporting are off.
--mode torch: the TRL-equivalent eager step, timed directly: one policy forward over [chosen; rejected] with
  log_softmax + gather on the response tokens, the reference's under no_grad, -logsigmoid(beta * margin),
  backward, clip_grad_norm_(1.0), AdamW(fused).step(), zero_grad().
Both use the HF Trainer's defaults otherwise: torch's default thread count, sdpa attention, fused AdamW.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dpo_common as common  # noqa: E402
import peer_common  # noqa: E402

EOS = 1  # the benchmark's responses end with this token


def main():
    args = common.parse_args(["trainer", "torch"])
    import torch
    from transformers import AutoModelForCausalLM

    prompt_NP, chosen_NR, rejected_NR = common.load_pairs(args)
    if not (chosen_NR[:, -1] == EOS).all() or not (rejected_NR[:, -1] == EOS).all():
        raise ValueError(f"every response must end with token {EOS} (the tokenizer's EOS)")
    load = lambda: AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)  # noqa: E731
    model, ref_model = load(), load()
    vers = common.versions("torch", "transformers", "accelerate", "trl")
    notes = [f"torch threads {torch.get_num_threads()}, attn_implementation={model.config._attn_implementation}"]
    seqs = [np.concatenate([prompt_NP, x], 1) for x in (chosen_NR, rejected_NR)]
    if args.mode == "torch":
        steps, first = _torch_step(model, ref_model, seqs, prompt_NP.shape[1], args)
        path = "torch DPO step (TRL-equivalent, eager)"
    else:
        steps, first, extra = _dpo_trainer(model, ref_model, prompt_NP, chosen_NR, rejected_NR, args)
        path = "trl.DPOTrainer.train() + callback"
        notes += extra
    common.write(args, steps, framework="TRL" if args.mode == "trainer" else "torch", path=path, **first,
                 versions=vers, notes=notes)


def _torch_step(model, ref_model, seqs, prompt_len, args):
    import torch
    import torch.nn.functional as F

    model.train()
    ref_model.eval()
    for p in ref_model.parameters():
        p.requires_grad_(False)
    ids = torch.from_numpy(np.concatenate(seqs, 0)).long()  # [2N, P + R]: chosen rows, then rejected rows
    targets = ids[:, prompt_len:]  # the response tokens, predicted from position prompt_len - 1 on
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)

    def logps(m):
        logits = m(input_ids=ids, use_cache=False).logits[:, prompt_len - 1:-1]
        return torch.gather(F.log_softmax(logits.float(), -1), 2, targets[..., None])[..., 0].sum(1).chunk(2)

    def step():
        chosen, rejected = logps(model)
        with torch.no_grad():
            ref_chosen, ref_rejected = logps(ref_model)
        loss = -F.logsigmoid(args.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return common.first_metrics(loss.detach(), chosen.detach().mean(), rejected.detach().mean())

    first, steps = common.time_steps(step, args.warmup, args.steps)
    return steps, first


def _dpo_trainer(model, ref_model, prompt_NP, chosen_NR, rejected_NR, args):
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    N = len(prompt_NP)
    V = model.config.vocab_size
    total = args.warmup + args.steps + 1  # + 1: the last timed interval ends at the start of this step
    # words "<17>", split on whitespace only: a special token's word ("<1>") is no substring of another word
    # (with "t1" as EOS, "t174" would be cut into "t1" + "74", as special tokens match anywhere in the text)
    tk = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(V)}, unk_token="<0>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<0>", pad_token="<0>", eos_token=f"<{EOS}>")
    text = lambda ids: " ".join(f"<{int(i)}>" for i in ids)  # noqa: E731
    # TRL tokenises prompt + chosen as one string: the prompt's trailing space keeps the words apart
    rows = [{"prompt": text(prompt_NP[n]) + " ", "chosen": text(chosen_NR[n]), "rejected": text(rejected_NR[n])}
            for n in range(N)]
    ds = Dataset.from_list([rows[i % N] for i in range(total * N)])

    class Timer(TrainerCallback):
        """Marks each step's start: step i lasts from its start to step i+1's."""

        def __init__(self):
            self.clock = peer_common.Clock()

        def on_step_begin(self, a, state, control, **kw):
            self.clock.mark()

    timer = Timer()
    cfg = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_dpo_"), per_device_train_batch_size=N, gradient_accumulation_steps=1,
        max_steps=total, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, bf16=False, fp16=False,
        use_cpu=True, beta=args.beta, loss_type=["sigmoid"], precompute_ref_log_probs=False, max_length=None,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, gradient_checkpointing=False,
    )
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[timer])
    _check_tokens(trainer.train_dataset, prompt_NP, chosen_NR, rejected_NR)
    first = _first_metrics(trainer, [trainer.train_dataset[n] for n in range(N)])
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    notes = [f"optim={cfg.optim}, {len(timer.clock.marks)} steps run (the last one only closes the last timed "
             f"interval), train() wall {wall:.2f}s"]
    return timer.clock.steps(args.warmup), first, notes


def _check_tokens(ds, prompt_NP, chosen_NR, rejected_NR):
    """TRL's tokenised rows are exactly the benchmark's ids."""
    for n in range(len(prompt_NP)):
        row = ds[n]
        for key, want in (("prompt_ids", prompt_NP[n]), ("chosen_ids", chosen_NR[n]), ("rejected_ids", rejected_NR[n])):
            if list(row[key]) != [int(x) for x in want]:
                raise ValueError(f"TRL tokenised pair {n} {key} differently: {list(row[key])[:8]}... vs "
                                 f"{[int(x) for x in want][:8]}...")


def _first_metrics(trainer, examples):
    """Loss and logps of the first batch (the pairs in order), with TRL's own loss code, before any update."""
    import torch

    model = trainer.model
    model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, trainer.data_collator(examples))
    m = trainer._metrics["train"]
    first = common.first_metrics(loss, m["logps/chosen"][-1], m["logps/rejected"][-1])
    m.clear()
    return first


if __name__ == "__main__":
    common.guarded(main)
