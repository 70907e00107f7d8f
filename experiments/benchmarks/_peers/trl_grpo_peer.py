"""TRL peer of `grpo_step.py`: `trl.GRPOTrainer.train()` on the shared HF directory (model and tokenizer), CPU.

GRPOConfig: use_vllm=False (transformers `generate` in the trainer's process), per_device_train_batch_size =
prompts x generations completions, num_generations = G, steps_per_generation = gradient_accumulation_steps =
num_iterations = 1 (one generation and one optimizer update a step, on-policy: TRL then skips the old-log-prob
forward), max_completion_length = the completion length and generation_kwargs min_new_tokens = the same (the
EOS logits are masked until then: every completion has exactly that many tokens, as polmjax's ignore_eos),
temperature 1, top_p 1, top_k 0 (no truncation), beta 0 (no reference model), loss_type "grpo" (per-sequence
token mean, then the mean over sequences: polmjax's seq_mean_token_mean), scale_rewards "group", epsilon 0.2,
AdamW (TRL's default torch AdamW; lr constant, weight decay 0, max_grad_norm 1.0), fp32 (bf16 off), no gradient
checkpointing (on by default in GRPOConfig), no logging, saving, evaluation, completion logging or progress bar,
no dataset shuffling. The dataset's rows are the prompt strings; TRL's sampler repeats each prompt G times.

Timing: a `TrainerCallback` marks each step's start (step i lasts until step i+1 starts; one extra step closes
the last interval). `GRPOTrainer._generate` (tokenize, `generate`, decode) is timed inside the step by a
subclass that only wraps it: the sampling part of the split.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpo_common as common  # noqa: E402


def main():
    args = common.parse_args(["trainer"])
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    prompts = common.load_prompts(args)
    total = args.warmup + args.steps + 1  # + 1: the last timed interval ends at the start of this step
    P, G, C = args.prompts_per_step, args.generations, args.completion_len
    if len(prompts) < total * P:
        raise ValueError(f"{len(prompts)} prompts for {total} steps of {P}")
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.hf_dir, padding_side="left")
    ds = Dataset.from_list([{"prompt": p} for p in prompts[:total * P]])

    class Timer(TrainerCallback):
        """Marks each step's start (step i lasts from its start to step i+1's); keeps the first step's mean
        reward from TRL's own metrics."""

        def __init__(self):
            self.clock, self.trainer, self.first_reward = common.Clock(), None, float("nan")

        def on_step_begin(self, a, state, control, **kw):
            self.clock.mark()

        def on_step_end(self, a, state, control, **kw):
            rewards = self.trainer._metrics["train"].get("reward", [])
            if state.global_step == 1 and rewards:
                self.first_reward = float(rewards[0])

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer with its sampling call timed (nothing else changed)."""

        def __init__(self, *a, **kw):
            self.generate_s, self.lengths, self.prompt_lengths = [], [], []
            super().__init__(*a, **kw)

        def _generate(self, prompts):
            t = time.perf_counter()
            out = super()._generate(prompts)
            self.generate_s.append(time.perf_counter() - t)
            self.prompt_lengths.append(sorted({len(ids) for ids in out[0]}))
            self.lengths.append(sorted({len(ids) for ids in out[1]}))
            return out

    timer = Timer()
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_grpo_"), use_cpu=True, use_vllm=False, bf16=False, fp16=False,
        per_device_train_batch_size=P * G, gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        num_generations=G, max_completion_length=C, generation_kwargs={"min_new_tokens": C}, temperature=1.0,
        top_p=1.0, top_k=0, beta=0.0, loss_type="grpo", scale_rewards="group", epsilon=0.2,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0, gradient_checkpointing=False, max_steps=total,
        shuffle_dataset=False, logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, log_completions=False, dataloader_num_workers=0, seed=0)
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[common.reward], args=cfg, train_dataset=ds,
                               processing_class=tokenizer, callbacks=[timer])
    timer.trainer = trainer
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    steps = timer.clock.steps(args.warmup)
    if len(trainer.generate_s) != total:
        raise RuntimeError(f"TRL sampled {len(trainer.generate_s)} times in {total} steps, expected once a step")
    if any(lengths != [C] for lengths in trainer.lengths):
        raise RuntimeError(f"TRL's completion lengths {trainer.lengths}, expected every one {C}")
    notes = [f"torch threads {torch.get_num_threads()}, attn_implementation={model.config._attn_implementation}, "
             f"optim={cfg.optim}; {len(timer.clock.marks)} steps run (the last one only closes the last timed "
             f"interval), train() wall {wall:.1f}s; prompt lengths seen {trainer.prompt_lengths[0]} (no padding "
             f"needed), completion lengths {trainer.lengths[0]}"]
    common.write(args, steps, generate_s=trainer.generate_s[args.warmup:args.warmup + len(steps)], framework="TRL",
                 path="trl.GRPOTrainer.train() + callback", notes=notes,
                 first_reward=timer.first_reward,
                 versions=common.versions("torch", "transformers", "accelerate", "trl"))


if __name__ == "__main__":
    common.guarded(main)
