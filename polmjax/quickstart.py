"""The survey's post-training pipeline end to end on one verifiable task: SFT -> reward model -> DPO -> GRPO.

    polmjax quickstart                                  # a tiny model on offline toy tasks, CPU, minutes
    polmjax quickstart --out runs/qs2 --set grpo.train.steps=100 --set dpo.beta=0.2
    polmjax quickstart --model path/to/hf_model --data tasks.jsonl --set grpo.rewards='[{"fn": "polmjax.rl.rewards:math_reward"}]'

Stages, each in its own run directory under --out (a killed quickstart reruns to the stage and step it
reached: the runs resume, finished stages are skipped, their evaluations are cached in results.json):

  data   toy tasks written offline (or --data: `prompt` + `answer` rows, optional `solution`), split into
         SFT examples (worked solutions), RL prompts and held-out test prompts that appear in neither
         (by default 60% of the toy "sort" demonstrations are sorted descending: `demo_noise`, a flaw of
         the demonstrations that imitation learns and the verifier sees);
  sft    SFT on the worked solutions (from a random init, or from --model);
  pairs  `pair_samples` samples per RL prompt from the SFT model, checked by the verifier: a prompt with a
         right and a wrong sample gives a preference pair (chosen = right), as in rejection-sampling
         pipelines (RAFT, Llama 2's RM data);
  rm     a reward model on the pairs; evaluated as best-of-k: it picks one of the SFT model's k samples;
  dpo    DPO from the SFT model on the pairs;
  grpo   GRPO from the SFT model with the verifiable reward.

Every stage is evaluated on the same held-out test prompts: greedy accuracy and pass@k. The table is
printed and written with the training curves (PNG) and a report into --out; the GRPO model is exported
as an HF directory (--out/grpo/export/hf). `--set stage.field=value` overrides a stage's experiment
(`sft.`, `rm.`, `dpo.`, `grpo.`), exactly as `--set` does for `polmjax <algo>`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time

import jax
import numpy as np

from polmjax import config as config_lib
from polmjax.data import DataConfig
from polmjax.data import toy as toy_lib
from polmjax.data.prompts import PromptSource
from polmjax.models import ModelConfig, RopeConfig
from polmjax.models.hf import from_pretrained
from polmjax.train.config import ModelSource, TrainConfig
from polmjax.train.optim import OptimConfig

log = logging.getLogger("polmjax")
STAGES = ("sft", "rm", "dpo", "grpo")
TINY = ModelConfig(family="qwen3", vocab_size=0, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                   num_kv_heads=2, head_dim=32, qk_norm=True, tie_embeddings=True, rope=RopeConfig(theta=10000.0))
EXACT = {"fn": "polmjax.rl.rewards:exact_match_reward", "isolate": False}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the quickstart itself decides (the stages' own settings are their experiments)."""

    out: str = "runs/quickstart"
    model: str = ""  # an HF model directory to start from (default: a tiny random Qwen3-style model)
    data: str = ""  # `prompt` + `answer` (+ `solution`) JSONL (default: the offline toy tasks)
    seed: int = 0
    test_prompts: int = 200
    pass_k: int = 4
    pair_prompts: int = 4096
    pair_samples: int = 4
    # toy data only: the fraction of "sort" demonstrations a careless annotator sorted descending. Imitation
    # learns the flaw (above 0.5 the SFT model's greedy answer is mostly descending, while its samples are
    # often ascending); the verifier, which wants ascending, gives the later stages the signal to fix it.
    demo_noise: float = 0.6

    def __post_init__(self):
        if not 0.0 <= self.demo_noise <= 1.0:
            raise config_lib.ConfigError(f"demo_noise={self.demo_noise}: a fraction of the sort demonstrations, "
                                         f"expected 0 <= demo_noise <= 1 (0: no flaw)")


def main(settings: Settings, overrides: list[str] = ()) -> dict:
    """Run (or resume) every stage; returns {stage: held-out metrics}."""
    t0 = time.perf_counter()
    os.makedirs(settings.out, exist_ok=True)
    data = prepare_data(settings)
    stages = stage_experiments(settings, data, overrides)
    results = _load(os.path.join(settings.out, "results.json"))
    from polmjax.train import dpo, grpo, rm, sft

    _banner("sft", stages["sft"])
    sft.run(stages["sft"])
    sft_model = os.path.join(stages["sft"].train.run_dir, "export", "hf")
    evaluator = Evaluator(settings, data, stages["grpo"])
    try:
        if "sft" not in results:
            results["sft"] = evaluator.evaluate(sft_model)
            _save(settings.out, results)
        mine_pairs(settings, data, sft_model, evaluator)
        _banner("rm", stages["rm"])
        rm.run(stages["rm"])
        if "rm" not in results:
            results["rm"] = evaluator.best_of_k(sft_model, os.path.join(stages["rm"].train.run_dir, "export", "hf"))
            _save(settings.out, results)
        for name, module in (("dpo", dpo), ("grpo", grpo)):
            _banner(name, stages[name])
            module.run(stages[name])
            if name not in results:
                results[name] = evaluator.evaluate(os.path.join(stages[name].train.run_dir, "export", "hf"))
                _save(settings.out, results)
    finally:
        evaluator.close()
    write_report(settings, stages, results, time.perf_counter() - t0)
    return results


# ----------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass(frozen=True)
class Data:
    sft: str  # prompt_completion JSONL (worked solutions)
    rl: str  # prompt JSONL (prompt + answer): RL prompts, and the source of the preference pairs
    test: str  # prompt JSONL: held-out, in neither of the above
    pairs: str  # preference JSONL, written by mine_pairs


def prepare_data(s: Settings) -> Data:
    """The three disjoint files (written once; a rerun reuses them, and refuses settings that would have
    written other data: they are kept in data/settings.json)."""
    d = os.path.join(s.out, "data")
    data = Data(*(os.path.join(d, f"{n}.jsonl") for n in ("sft", "rl", "test", "pairs")))
    wanted = {k: v for k, v in dataclasses.asdict(s).items() if k != "out"}
    saved = _load(os.path.join(d, "settings.json"))
    if os.path.exists(data.test):
        changed = [f"{k}: {saved[k]!r} -> {v!r}" for k, v in wanted.items() if k in saved and saved[k] != v]
        if changed:
            raise config_lib.ConfigError(f"{s.out} holds a quickstart with other settings ({'; '.join(changed)}); "
                                         f"rerun with the same ones to resume it, or pass another --out")
        return data
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "settings.json"), "w") as f:
        json.dump(wanted, f, indent=1)
    rows = _user_rows(s.data) if s.data else _toy_rows(s.seed, s.demo_noise)
    rng = random.Random(s.seed)
    rng.shuffle(rows)
    key = lambda r: json.dumps(r["prompt"], sort_keys=True)  # noqa: E731
    test, seen = [], set()
    for r in rows:  # distinct test prompts first
        if len(test) < s.test_prompts and key(r) not in seen:
            test.append(r)
        seen.add(key(r))
    held_out = {key(r) for r in test}
    rest = [r for r in rows if key(r) not in held_out]
    half = len(rest) // 2
    _write(data.sft, [{"prompt": r["prompt"], "completion": _assistant(r, r.get("solution") or r["answer"])}
                      for r in rest[:half]])
    _write(data.rl, rest[half:])
    _write(data.test, test)
    return data


def _toy_rows(seed: int, demo_noise: float) -> list[dict]:
    """Toy tasks with their answers and `task` name; `solution` (the SFT demonstration) of a "sort" task is
    sorted descending with probability `demo_noise` (the `answer` the verifier checks is ascending)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(8000):
        prompt, answer = toy_lib._task(rng)
        task = prompt.split(" ")[0].rstrip(":")
        solution = answer
        if task == "sort" and rng.random() < demo_noise:
            solution = " ".join(reversed(answer.split(" ")))  # the careless annotator sorted descending
        rows.append({"prompt": [{"role": "user", "content": prompt}], "answer": answer, "solution": solution,
                     "task": task})
    return rows


def _user_rows(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for field in ("prompt", "answer"):
                if field not in row:
                    raise config_lib.ConfigError(f"{path} row {n}: field '{field}' is missing (the quickstart's "
                                                 f"data is `prompt` + `answer` rows, optional `solution`)")
            rows.append(row)
    if not rows:
        raise config_lib.ConfigError(f"{path}: no rows")
    return rows


def _assistant(row: dict, text: str):
    return [{"role": "assistant", "content": str(text)}] if isinstance(row["prompt"], list) else str(text)


def _write(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# The stages' experiments


def stage_experiments(s: Settings, data: Data, overrides: list[str]) -> dict:
    """{stage: experiment}: the defaults below, then `--set stage.key=value` overrides, validated."""
    from polmjax.train.dpo import DPOExperiment
    from polmjax.train.grpo import GRPOExperiment, Reward
    from polmjax.train.rm import RMExperiment
    from polmjax.train.sft import SFTExperiment

    run_dir = lambda name: os.path.join(s.out, name)  # noqa: E731
    sft_model = os.path.join(run_dir("sft"), "export", "hf")
    start = ModelSource(path=s.model) if s.model else ModelSource(init=TINY, tokenizer="toy")
    quiet = dict(log_every=25, save_every=50, keep=1, tensorboard=False, seed=s.seed)
    stages = {
        "sft": SFTExperiment(
            model=start, data=DataConfig(path=data.sft, packing="best_fit"),
            train=TrainConfig(run_dir=run_dir("sft"), steps=600, global_batch=32, seq_len=128, **quiet),
            optim=OptimConfig(lr=2e-3, schedule="cosine", warmup_steps=20, weight_decay=0.01)),
        "rm": RMExperiment(
            model=ModelSource(path=sft_model, num_labels=1), data=DataConfig(path=data.pairs, packing="best_fit"),
            train=TrainConfig(run_dir=run_dir("rm"), steps=150, global_batch=16, seq_len=128, **{**quiet, "log_every": 10}),
            optim=OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=10)),
        "dpo": DPOExperiment(
            model=ModelSource(path=sft_model), data=DataConfig(path=data.pairs, packing="best_fit"),
            train=TrainConfig(run_dir=run_dir("dpo"), steps=100, global_batch=16, seq_len=128, **{**quiet, "log_every": 10}),
            # DPO + the chosen responses' NLL (RPO, as iterative reasoning preference optimisation,
            # Pang et al. 2024): plain DPO lowers the likelihood of both responses of a pair
            optim=OptimConfig(lr=5e-4, schedule="cosine", warmup_steps=10), loss="sigmoid", beta=0.1,
            nll_weight=1.0),
        "grpo": GRPOExperiment(
            model=ModelSource(path=sft_model), data=DataConfig(path=data.rl),
            train=TrainConfig(run_dir=run_dir("grpo"), steps=60, global_batch=64, seq_len=64,
                              **{**quiet, "log_every": 5, "save_every": 20}),
            optim=OptimConfig(lr=3e-5, schedule="constant"), rewards=(Reward(**EXACT),), num_generations=8,
            max_completion_len=16),
    }
    for item in overrides:
        stage, _, rest = item.partition(".")
        if stage not in stages or not rest:
            raise config_lib.ConfigError(f"--set {item}: expected <stage>.<field>=<value> with a stage of "
                                         f"{', '.join(STAGES)}")
        stages[stage] = config_lib.apply_override(stages[stage], rest)
    for exp in stages.values():
        config_lib.validate(exp)
    return stages


# ----------------------------------------------------------------------------------------------
# Preference pairs and evaluation


class Evaluator:
    """Held-out evaluation of any stage's exported model with the GRPO stage's sampler settings and reward."""

    def __init__(self, s: Settings, data: Data, grpo_exp):
        from polmjax.mesh import make_mesh
        from polmjax.train.run import load_tokenizer

        self.s, self.exp = s, grpo_exp
        self.mesh = make_mesh(1, -1, 1)
        self.tokenizer = load_tokenizer(ModelSource(path="", tokenizer=os.path.join(s.out, "sft", "export", "hf")), "")
        once = DataConfig(path=data.test, num_epochs=1)
        self.test = iter(PromptSource(once, self.tokenizer, max_prompt_len=grpo_exp.max_prompt_len)).take(10**9)
        self.rl = PromptSource(DataConfig(path=data.rl), self.tokenizer, max_prompt_len=grpo_exp.max_prompt_len)
        self.key = jax.random.key(s.seed + 1)
        self.group_by = "task" if self.test and "task" in self.test[0].fields else ""  # per-task accuracy
        self._sampler = None

    def sampler(self, cfg):
        from polmjax.rl.rollout import PolicySampler

        if self._sampler is None or self._sampler.cfg != cfg:
            if self._sampler is not None:
                self._sampler.close()
            e = self.exp
            self._sampler = PolicySampler(cfg, self.tokenizer, self.mesh, [r.build() for r in e.rewards],
                                          max_new_tokens=e.max_completion_len, temperature=e.temperature,
                                          top_k=e.top_k, top_p=e.top_p, min_p=e.min_p,
                                          stop_sequences=e.stop_sequences, cache_dtype=e.cache_dtype)
        return self._sampler

    def close(self):
        if self._sampler is not None:
            self._sampler.close()

    def evaluate(self, model_dir: str) -> dict:
        model = from_pretrained(model_dir, mesh=self.mesh)
        return self.sampler(model.config).evaluate(model.params(), self.test, k=self.s.pass_k, key=self.key,
                                                   group_by=self.group_by)

    def best_of_k(self, policy_dir: str, rm_dir: str) -> dict:
        """Accuracy of the sample the reward model ranks first among the policy's k samples per test prompt."""
        from polmjax.rl.rollout import per_group
        from polmjax.train.rm import score

        policy = from_pretrained(policy_dir, mesh=self.mesh)
        sampler = self.sampler(policy.config)
        k = self.s.pass_k
        draws = sampler.generate(policy.params(), self.test, jax.random.fold_in(self.key, 0), n=k)
        correct = sampler.correct(sampler.score(self.test, draws, n=k)).reshape(-1, k)
        reward_model = from_pretrained(rm_dir, mesh=self.mesh)
        prompts = [p.prompt for p in self.test for _ in range(k)]
        texts = sampler.texts(draws)
        scored = [i for i, t in enumerate(texts) if t.strip()]  # an empty completion is a row the data refuses
        r = np.full(len(texts), -np.inf, np.float32)
        r[scored] = score(reward_model, self.tokenizer, [prompts[i] for i in scored],
                          [_assistant({"prompt": prompts[i]}, texts[i]) for i in scored])
        r = r.reshape(-1, k)
        picked = correct[np.arange(len(correct)), r.argmax(axis=1)]
        out = {"accuracy": float(picked.mean()), f"pass@{k}": float(correct.any(axis=1).mean()),
               "accuracy_sampled": float(correct.mean()), "prompts": float(len(correct))}
        if self.group_by:
            out.update(per_group(self.test, self.group_by, k, picked, correct.any(axis=1)))
        return out


def mine_pairs(s: Settings, data: Data, sft_model: str, evaluator: Evaluator) -> int:
    """Preference pairs from the SFT model's own samples, checked by the verifier (written once)."""
    if os.path.exists(data.pairs):
        return sum(1 for _ in open(data.pairs))
    log.info("mining preference pairs: %d samples of each of %d prompts", s.pair_samples, s.pair_prompts)
    model = from_pretrained(sft_model, mesh=evaluator.mesh)
    sampler = evaluator.sampler(model.config)
    prompts = iter(evaluator.rl).take(s.pair_prompts)
    rows = []
    for start in range(0, len(prompts), 128):
        chunk = prompts[start:start + 128]
        draws = sampler.generate(model.params(), chunk, jax.random.fold_in(evaluator.key, 7 + start), n=s.pair_samples)
        correct = sampler.correct(sampler.score(chunk, draws, n=s.pair_samples)).reshape(len(chunk), -1)
        texts = np.asarray(sampler.texts(draws), object).reshape(len(chunk), -1)
        for p, ok, t in zip(chunk, correct, texts):
            said = np.array([bool(x.strip()) for x in t])  # an empty response is not a preference example
            ok, wrong = ok & said, ~ok & said
            if ok.any() and wrong.any():
                row = {"prompt": p.prompt}
                rows.append(row | {"chosen": _assistant(row, t[ok][0]), "rejected": _assistant(row, t[wrong][0])})
    if not rows:
        raise RuntimeError("no preference pairs: the SFT model's samples are all right or all wrong; "
                           "raise pair_samples or the sampling temperature")
    _write(data.pairs, rows)
    log.info("%d preference pairs from %d prompts", len(rows), len(prompts))
    return len(rows)


# ----------------------------------------------------------------------------------------------
# Report


def write_report(s: Settings, stages: dict, results: dict, seconds: float) -> str:
    """The table (printed), curves.png, accuracy.png and report.md in --out."""
    k = s.pass_k
    lines = [f"| stage | held-out accuracy (greedy) | pass@{k} | accuracy of samples (T={stages['grpo'].temperature:g}) |",
             "|---|---:|---:|---:|"]
    for name in STAGES:
        r = results.get(name, {})
        label = {"rm": "rm (best-of-%d of the SFT model)" % k}.get(name, name)
        lines.append(f"| {label} | {r.get('accuracy', float('nan')):.3f} | {r.get(f'pass@{k}', float('nan')):.3f} | "
                     f"{r.get('accuracy_sampled', float('nan')):.3f} |")
    groups = sorted({key.split("/", 1)[1] for r in results.values() for key in r if key.startswith("accuracy/")})
    if groups:  # greedy accuracy per task (the rm row: its best-of-k pick)
        lines += ["", "| stage | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
        for name in STAGES:
            r = results.get(name, {})
            lines.append(f"| {name} | " + " | ".join(f"{r.get(f'accuracy/{g}', float('nan')):.3f}" for g in groups) + " |")
    table = "\n".join(lines)
    print("\n" + table + "\n", flush=True)
    pngs = _plots(s.out, stages, results, k)
    n = int(results.get("sft", {}).get("prompts", 0))
    report = (f"# polmjax quickstart\n\n{n} held-out test prompts, seed {s.seed}, {seconds / 60:.1f} min "
              f"(this invocation).\n\n{table}\n\n" + "".join(f"![{p}]({p})\n" for p in pngs))
    with open(os.path.join(s.out, "report.md"), "w") as f:
        f.write(report)
    return report


def _plots(out: str, stages: dict, results: dict, k: int) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plots")
        return []
    curves = {"sft": ("loss", "SFT loss"), "rm": ("accuracy", "RM pair accuracy (train)"),
              "dpo": ("rewards/accuracies", "DPO reward accuracy (train)"), "grpo": ("reward", "GRPO reward (train)")}
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, (name, (key, title)) in zip(axes, curves.items()):
        rows = _metrics(stages[name].train.run_dir)
        xs = [r["step"] for r in rows if key in r]
        ax.plot(xs, [r[key] for r in rows if key in r])
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = [n for n in STAGES if n in results]
    x = np.arange(len(names))
    ax.bar(x - 0.2, [results[n]["accuracy"] for n in names], 0.4, label="greedy accuracy")
    ax.bar(x + 0.2, [results[n][f"pass@{k}"] for n in names], 0.4, label=f"pass@{k}")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title("held-out test prompts")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"), dpi=100)
    plt.close(fig)
    return ["curves.png", "accuracy.png"]


def _metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if "split" not in r]


def _banner(name: str, exp) -> None:
    if jax.process_index() == 0:
        print(f"\n== {name}: {exp.train.steps} steps -> {exp.train.run_dir}", flush=True)


def _load(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _save(out: str, results: dict) -> None:
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, os.path.join(out, "results.json"))
