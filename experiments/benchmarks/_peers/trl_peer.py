"""TRL peer of `sft_throughput.py`.

--mode trainer: `trl.SFTTrainer.train()` on a pre-tokenized dataset (input_ids + labels, so TRL neither
  tokenizes nor masks anything), every step timed by a `TrainerCallback` (start of step i+1 minus start of
  step i: data loading, the fused-LM-head loss TRL computes, its metrics, clipping and the optimizer all count;
  one extra step runs last so that no timed interval holds the end-of-training work). Logging, saving,
  evaluation, progress bars and reporting are off.
--mode torch: the TRL-equivalent eager step, timed directly:
  model(input_ids, labels=labels).loss.backward(); clip_grad_norm_(1.0); AdamW(fused).step(); zero_grad().
Both use the HF Trainer's defaults otherwise: torch's default thread count, sdpa attention, fused AdamW.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import peer_common as common  # noqa: E402


def main():
    args = common.parse_args(["trainer", "torch"])
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    tokens_BT, loss_mask_BT = common.load_batch(args)
    labels_BT = np.where(loss_mask_BT > 0, tokens_BT, -100).astype(np.int64)  # HF shifts labels itself
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    vers = common.versions("torch", "transformers", "accelerate", "trl")
    notes = [f"torch threads {torch.get_num_threads()}, attn_implementation={model.config._attn_implementation}"]
    if args.mode == "torch":
        steps, first_loss = _torch_step(model, tokens_BT, labels_BT, args)
        path = "torch step (TRL-equivalent, eager)"
    else:
        steps, first_loss, extra = _sft_trainer(model, tokens_BT, labels_BT, args)
        path = "trl.SFTTrainer.train() + callback"
        notes += extra
    common.write(args, framework="TRL" if args.mode == "trainer" else "torch", path=path, steps=steps,
                 first_loss=first_loss, versions=vers, notes=notes)


def _torch_step(model, tokens_BT, labels_BT, args):
    import torch

    model.train()
    ids = torch.from_numpy(tokens_BT).long()
    labels = torch.from_numpy(labels_BT)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)

    def step():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    first, steps = common.time_steps(step, args.warmup, args.steps)
    return steps, first


def _sft_trainer(model, tokens_BT, labels_BT, args):
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    B, T = tokens_BT.shape
    V = model.config.vocab_size
    total = args.warmup + args.steps + 1  # + 1: the last timed interval ends at the start of this step
    # a word-level tokenizer over the model's vocabulary: SFTTrainer wants a processing class, the data is
    # already token ids
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", pad_token="t0", eos_token="t1")
    rows = [i % B for i in range(total * B)]
    ds = Dataset.from_dict({"input_ids": [tokens_BT[i].tolist() for i in rows],
                            "labels": [labels_BT[i].tolist() for i in rows]})

    class Timer(TrainerCallback):
        """Marks each step's start: step i lasts from its start to step i+1's."""

        def __init__(self):
            self.clock = common.Clock()

        def on_step_begin(self, a, state, control, **kw):
            self.clock.mark()

    timer = Timer()
    out_dir = tempfile.mkdtemp(prefix="trl_sft_")
    cfg = SFTConfig(
        output_dir=out_dir, per_device_train_batch_size=B, gradient_accumulation_steps=1, max_steps=total,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        bf16=False, fp16=False, use_cpu=True, packing=False, padding_free=False, max_length=T,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, gradient_checkpointing=False,
    )
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
    # the first step's loss on our batch, with the same forward TRL trains with (before any update)
    first_loss = _first_loss(trainer, tokens_BT, labels_BT)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    notes = [f"optim={cfg.optim}, {len(timer.clock.marks)} steps run (the last one only closes the last timed "
             f"interval), train() wall {wall:.2f}s"]
    return timer.clock.steps(args.warmup), first_loss, notes


def _first_loss(trainer, tokens_BT, labels_BT):
    import torch

    model = trainer.model
    was_training = model.training
    model.train()
    with torch.no_grad():
        inputs = {"input_ids": torch.from_numpy(tokens_BT).long(), "labels": torch.from_numpy(labels_BT),
                  "attention_mask": torch.ones(tokens_BT.shape, dtype=torch.long)}
        loss = trainer.compute_loss(model, inputs)
    trainer._metrics["train"].clear()
    model.train(was_training)
    return float(loss)


if __name__ == "__main__":
    common.guarded(main)
