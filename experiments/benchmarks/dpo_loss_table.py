"""Every DPO-family loss on the tiny preference task: held-out accuracy before and after, one table.

Starts each loss from the tiny SFT model (`polmjax sft experiments/sft/tiny.py` first) with
experiments/dpo/tiny.py's settings, and prints a markdown table of held-out metrics on the same 200
held-out pairs: `rewards/accuracies` (the loss's implied reward ranks chosen above rejected; TRL's
metric) and `logps/accuracies` (the policy itself gives the chosen answer the higher log-prob), at
the start (the SFT model: one step at lr 0) and after `--steps`.

    python experiments/benchmarks/dpo_loss_table.py                       # every loss, 100 steps each
    python experiments/benchmarks/dpo_loss_table.py --losses sigmoid ipo --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import time

# loss -> overrides: the loss's own hyperparameters where the default (beta 0.1) is not its regime
LOSSES = {
    "sigmoid": [],
    "robust": ['loss_kwargs={"label_smoothing": 0.1}'],
    "ipo": [],
    "hinge": [],
    "exo_pair": ['loss_kwargs={"label_smoothing": 0.001}'],
    "nca_pair": [],
    "bco_pair": [],
    "sppo_hard": [],
    "aot": [],
    "aot_unpaired": [],
    "apo_zero": [],
    "apo_down": [],
    "discopop": [],
    "sigmoid_norm": [],
    "simpo": ["reference=none", "beta=2.0", 'loss_kwargs={"gamma": 0.5}'],
    "orpo": ["reference=none", "nll_weight=1.0"],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--losses", nargs="*", default=list(LOSSES))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default="runs/dpo_loss_table")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)

    from polmjax.config import load_experiment
    from polmjax.train import dpo

    experiment = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dpo", "tiny.py")
    common = [*args.overrides, "train.export_hf=false", "train.save_every=100000", "train.keep=1"]

    def held_out(name, extra, steps):
        run_dir = os.path.join(args.out, name)
        exp = load_experiment(experiment, [*common, f"train.run_dir={run_dir}", f"train.steps={steps}",
                                           f"train.eval_every={steps}", *extra])
        t0 = time.perf_counter()
        dpo.run(exp)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            rows = [r for r in map(json.loads, f) if r.get("split") == "eval"]
        return rows[-1], time.perf_counter() - t0

    start, _ = held_out("start", ["optim.warmup_steps=1"], 1)  # the first step of a warm-up has lr 0
    lines = [f"| loss | held-out rewards/accuracies | held-out logps/accuracies (start {start['logps/accuracies']:.3f})"
             f" | held-out loss |", "|---|---|---|---|"]
    for loss in args.losses:
        end, _ = held_out(loss, [f"loss={loss}", *LOSSES.get(loss, [])], args.steps)
        lines.append(f"| `{loss}` | {end['rewards/accuracies']:.3f} | {end['logps/accuracies']:.3f} | "
                     f"{end['loss']:.4f} |")
        print(lines[-1], flush=True)
    print(f"\n{args.steps} steps each from runs/sft_tiny/export/hf; {int(start['pairs'])} held-out pairs\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
