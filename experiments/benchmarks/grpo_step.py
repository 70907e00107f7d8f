"""Benchmark: one whole GRPO step (sample, score, update) of polmjax vs TRL vs tunix on the same model and prompts.

One run builds the SFT benchmark's tiny Llama-style model once with polmjax (`sft_throughput.build_model`, the
vocabulary of the offline toy tokenizer, rope theta 1e6 because tunix's Llama 3 always uses that) and saves it
with that tokenizer as a Hugging Face directory, so every framework trains the *same weights* with the same
tokenizer; writes the prompts (strings of exactly --prompt-len tokens, `_peers/grpo_common.py`); then runs each
framework's GRPO trainer in its own subprocess, one after the other (`sft_throughput.run_rows`), and prints one
table: seconds per step (median of --steps timed steps after --warmup untimed ones), the ratio to polmjax,
the part of the step spent sampling and the rest (scoring, batch layout, forward + backward + optimizer, the
loop), and the sampling rate. Every row does the same work a step:

  sample   --prompts-per-step prompts x --generations completions (the group), temperature 1, no top-k/top-p,
           exactly --completion-len tokens each (EOS ignored: every framework generates the same number of tokens)
  score    the same trivial reward (`grpo_common.reward`: character codes mod 2, in-process, about free)
  update   GRPO advantages (group mean, / group std), the clipped surrogate (epsilon 0.2) averaged per sequence
           then over sequences, beta 0 (no reference model), one optimizer update a step (on-policy: no old
           log-prob forward), full fine-tuning, fp32, AdamW (lr --lr constant, betas 0.9/0.999, eps 1e-8, weight
           decay 0, global-norm clipping 1.0), on CPU

Rows (the code path each one times):
  polmjax  polmjax.train.run.run(exp, grpo.ALGORITHM)   the `polmjax grpo` run: Rollout.step = rl.sampler
                                                        (one prefill per prompt, n rows decoded in a while
                                                        loop) + score + jitted grpo_step; a 1-device mesh
  TRL      trl.GRPOTrainer.train()                      use_vllm=False: transformers `generate` (prompts
                                                        repeated G times, each copy prefilled), then the
                                                        torch step; EOS ignored by min_new_tokens = max
  tunix    tunix.rl.grpo.GRPOLearner.train()            RLCluster with the vanilla rollout (tunix's Sampler,
                                                        prompts repeated G times) and the actor trainer on one
                                                        1-device mesh (rollout and actor share the model: no
                                                        weight sync); EOS ignored by an EOS id outside the vocab

Each row is timed between the starts of consecutive steps (a step plus its loop's work until the next one;
one extra step closes the last interval); the sampling part is each framework's own generate call, timed
inside the step (polmjax's `time/generate`; TRL's `_generate`; tunix's `RLCluster.generate`).
What still differs between the rows' work is printed under the table (`DIFFERENCES`).

polmjax runs in this interpreter's environment; TRL and tunix in the peers' venv (`peer_venv.py`: --peer-python,
$POLMJAX_BENCH_PYTHON or experiments/benchmarks/.peer-venv, built on first use; --no-build-peers skips those rows
instead). Run from the repository root (CPU, 2 cores: about 5 minutes at load average 8, less when idle):

    .venv/bin/python experiments/benchmarks/grpo_step.py
    .venv/bin/python experiments/benchmarks/grpo_step.py --rounds 2 --prompts-per-step 8 --completion-len 128
    .venv/bin/python experiments/benchmarks/grpo_step.py --quick      # every row once, tiny sizes (smoke)

--json PATH also writes the table's rows as JSON (`run_all.py` collects them into RESULTS.md).

Shared machines: as `sft_throughput.py` (--quiet, --quiet-wait, --rounds; * marks a row timed on a busy machine).
A benchmark, not a test: on CPU the ratios compare XLA:CPU with PyTorch's CPU kernels as much as the frameworks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile

import sft_throughput as bench
from peer_venv import default_peer_python

ROPE_THETA = 1e6  # tunix's Llama 3 ignores the checkpoint's theta and uses 1e6

# (row name, peer script, mode, interpreter: "self" or "peer"), as sft_throughput.ROWS
ROWS = [
    ("polmjax", "polmjax_grpo_peer.py", "run", "self"),
    ("TRL", "trl_grpo_peer.py", "trainer", "peer"),
    ("tunix", "tunix_grpo_peer.py", "learner", "peer"),
]
SKIPPABLE = ("trl", "tunix")
DIFFERENCES = [
    "prefill: polmjax prefills each prompt once and repeats its KV-cache rows G times; TRL (transformers "
    "generate) and tunix (the learner repeats the prompts) prefill all G copies",
    "polmjax's sampler also returns two log-probs of every sampled token (sampling and model distribution), used "
    "for its mismatch metrics; TRL's and tunix's samplers return none here",
    "EOS: TRL masks the EOS logits until min_new_tokens, so EOS is never sampled; polmjax (ignore_eos) and tunix "
    "(an EOS id outside the vocabulary) sample from the full softmax and go on past a sampled EOS",
    "tunix takes completion tokens equal to the pad id (0) for padding, masked from attention and loss (a random "
    "model samples it about once in 384 tokens); polmjax and TRL train on them. Shapes and FLOPs are the same",
    "TRL applies the LM head to the completion positions only (logits_to_keep); polmjax and tunix to every "
    "position (V=384: a small part of the step here)",
    "polmjax pads a prompt batch to a bucket (64, 128, ...): with --prompt-len not a bucket it prefills more "
    "tokens than the others",
]
QUICK = dict(prompts_per_step=2, generations=2, prompt_len=8, completion_len=8, steps=1, warmup=1, rounds=1,
             quiet_wait=0.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("--generations", type=int, default=4, help="completions per prompt (the group size G)")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens of every prompt, BOS included")
    p.add_argument("--completion-len", type=int, default=64, help="tokens of every completion (EOS ignored)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--steps", type=int, default=4, help="timed steps a row (median reported)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps first (compilation; tunix compiles its train step twice)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every row this many times, alternating the order, and pool the timed steps")
    p.add_argument("--skip", default="", help=f"comma-separated rows to leave out: {','.join(SKIPPABLE)}")
    p.add_argument("--peer-python", default=default_peer_python(),
                   help="interpreter of the venv holding trl, torch==2.13.0 and google-tunix (default "
                        "$POLMJAX_BENCH_PYTHON, else experiments/benchmarks/.peer-venv, built on first use)")
    p.add_argument("--no-build-peers", action="store_true",
                   help="never build the peers' venv: without one, the TRL and tunix rows are skipped")
    p.add_argument("--quiet", type=float, default=0.10, help="see sft_throughput.py")
    p.add_argument("--quiet-wait", type=float, default=15.0, help="see sft_throughput.py")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed to each peer subprocess")
    p.add_argument("--workdir", default=None, help="keep the HF model, prompts and peer logs here (default: tmp)")
    p.add_argument("--json", default="", help="also write the table's rows, versions and load here (JSON)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: every row once with tiny sizes (" + ", ".join(f"{k}={v}" for k, v in
                                                                                 QUICK.items()) + "); no timing value")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1 or args.prompts_per_step < 1:
        p.error("--warmup, --steps, --rounds and --prompts-per-step must be >= 1")
    if args.generations < 2 or args.prompt_len < 5 or args.completion_len < 1:
        p.error("--generations must be >= 2 (TRL and tunix refuse 1), --prompt-len >= 5, --completion-len >= 1")
    skip = {s.strip().lower() for s in args.skip.split(",") if s.strip()}
    if skip - set(SKIPPABLE):
        p.error(f"--skip: unknown {sorted(skip - set(SKIPPABLE))}; choose from {','.join(SKIPPABLE)}")

    workdir = args.workdir or tempfile.mkdtemp(prefix="grpo_step_")
    os.makedirs(workdir, exist_ok=True)
    print(f"== GRPO step: {args.prompts_per_step} prompts x {args.generations} completions of {args.prompt_len} + "
          f"{args.completion_len} tokens (EOS ignored), T=1, beta 0, one AdamW update (lr {args.lr}) a step, fp32, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {args.rounds} round(s); workdir {workdir}")
    hf_dir, prompts_path = _prepare(workdir, args)
    load_before = os.getloadavg()
    argv_common = ["--hf-dir", hf_dir, "--prompts", prompts_path, "--prompts-per-step", str(args.prompts_per_step),
                   "--generations", str(args.generations), "--prompt-len", str(args.prompt_len),
                   "--completion-len", str(args.completion_len), "--lr", str(args.lr), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
    rows = [r for r in ROWS if bench._key(r) not in skip]
    peer, no_peer = bench.resolve_peer(args) if any(r[3] == "peer" for r in rows) else (None, None)
    results, versions = bench.run_rows(rows, argv_common, args, workdir, peer, no_peer, width=44)
    for row, r in zip(rows, results):  # run_rows pools step times over rounds; pool the sampling times alike
        _pool_generate(r, row, workdir, args)
    load_after = os.getloadavg()
    _print_report(results, versions, args, load_before, load_after)
    if args.json:
        tokens = args.prompts_per_step * args.generations * args.completion_len
        rows = [bench.summary_row(r, results, args.quiet, first_reward=(r or {}).get("first_reward"),
                                  **_sampling(r, args.quiet, tokens)) for r in results]
        bench.write_json(args.json, "grpo_step", args, rows, versions, load_before, load_after,
                         differences=DIFFERENCES, notes=bench.row_notes(results))


def _prepare(workdir, args):
    """The one model + tokenizer (saved as HF) and the prompts every framework trains on."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before polmjax imports jax (as build_model does)
    import numpy as np

    from polmjax.data import toy
    from polmjax.models import RopeConfig

    tokenizer = toy.build_tokenizer(os.path.join(workdir, "tokenizer"))
    hf_dir, _ = bench.build_model(workdir, vocab_size=len(tokenizer), rope=RopeConfig(theta=ROPE_THETA))
    tokenizer.save_pretrained(hf_dir)
    rs = np.random.RandomState(0)
    n = (args.warmup + args.steps + 1) * args.prompts_per_step * args.rounds
    # every digit is one token of the toy tokenizer: prompts of exactly prompt_len tokens, BOS first
    prefix = "<s>sort: "
    digits = args.prompt_len - len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    prompts = [prefix + "".join(map(str, rs.randint(0, 10, digits))) for _ in range(n)]
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != args.prompt_len or ids[0] != tokenizer.bos_token_id:
            raise RuntimeError(f"prompt {text!r} is {len(ids)} tokens, expected {args.prompt_len} starting with BOS")
    prompts_path = os.path.join(workdir, "prompts.jsonl")
    with open(prompts_path, "w") as f:
        for text in prompts:
            f.write(json.dumps({"prompt": text}) + "\n")
    return hf_dir, prompts_path


def _pool_generate(r, row, workdir, args):
    """generate_s of every round's result file (the names run_rows gives them), as run_rows pools step_times."""
    if not r or not r.get("step_times") or args.rounds == 1:
        return
    pooled = []
    for rnd in range(args.rounds):
        path = os.path.join(workdir, f"{bench._key(row)}_{row[2]}_r{rnd}.json")
        if os.path.exists(path):
            with open(path) as f:
                pooled += json.load(f).get("generate_s", [])
    r["generate_s"] = pooled


def _sampling(r, quiet, tokens):
    """The table's sampling columns of a row: {sampling_s, rest_s, sampled_tokens_s}, None where not timed."""
    if not r or not r.get("step_times") or not r.get("generate_s"):
        return {"sampling_s": None, "rest_s": None, "sampled_tokens_s": None}
    sec, gen = bench._seconds(r, quiet)[0], statistics.median(r["generate_s"])
    return {"sampling_s": gen, "rest_s": sec - gen, "sampled_tokens_s": tokens / gen}


def _print_report(results, versions, args, load_before, load_after):
    base = next((r for r in results if r and r.get("framework") == "polmjax" and r.get("step_times")), None)
    base_s = bench._seconds(base, args.quiet)[0] if base else None
    tokens = args.prompts_per_step * args.generations * args.completion_len
    print()
    print("| framework | code path timed | s/step | vs polmjax | sampling s | rest s | sampled tokens/s | "
          "quiet/n | reward@1 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    flagged = False
    for r in results:
        if not r or not r.get("step_times"):
            r = r or {}
            print(f"| {r.get('framework', '?')} | {r.get('path', '')} | SKIPPED: {r.get('error')} | | | | | | |")
            continue
        sec, _, all_quiet = bench._seconds(r, args.quiet)
        flagged |= not all_quiet
        gen = statistics.median(r["generate_s"]) if r.get("generate_s") else None
        gen_cols = f"{gen:.3f} | {sec - gen:.3f} | {tokens / gen:,.0f}" if gen else "n/a | n/a | n/a"
        print(f"| {r['framework']} | {r['path']} | {sec:.3f}{'' if all_quiet else '*'} | "
              f"{f'{sec / base_s:.2f}x' if base_s else 'n/a'} | {gen_cols} | "
              f"{bench._n_quiet(r, args.quiet)}/{len(r['step_times'])} | {r.get('first_reward', float('nan')):.3f} |")
    print()
    print(f"s/step: median over the quiet timed steps (other processes took < {args.quiet:.0%} of the CPUs "
          f"meanwhile); * = fewer than 3 were quiet, median of all steps (busy machine: rerun, or --rounds 3). "
          f"vs polmjax: s/step / polmjax's (> 1: slower than polmjax). sampling s: median of the steps' own "
          f"generate call; rest s = s/step - sampling s (scoring, batch layout, the update, the loop). sampled "
          f"tokens/s = {tokens} completion tokens a step / sampling s. reward@1: mean reward of the first step's "
          f"completions (the samples differ between frameworks: their RNGs do).")
    if flagged:
        print("WARNING: some rows were timed on a busy machine (*): their numbers are inflated (torch's more "
              "than XLA's: its OpenMP threads slow down most when other processes hold the cores).")
    print("What differs between the rows' work:")
    for d in DIFFERENCES:
        print(f"  - {d}")
    for r in results:
        for note in (r or {}).get("notes", []):
            print(f"note ({r.get('framework')}): {note}")
    print()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    print(f"hardware: {bench._cpu_model()}, {os.cpu_count()} logical cores ({len(os.sched_getaffinity(0))} usable), "
          f"{bench._mem_gib():.0f} GiB RAM, {platform.system()} {platform.release()}, python {platform.python_version()}")
    print(f"load average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
