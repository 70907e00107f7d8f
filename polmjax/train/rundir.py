"""A run directory is a contract: a command started on a directory that holds a run continues that run.

`prepare(exp)` runs before anything is written into `exp.train.run_dir` and compares the new resolved
config with the saved `config.json`:

- no `config.json`: a new run; it is written.
- the same config: resume.
- only execution settings changed (logging, eval, checkpoint and sample cadence, export, TensorBoard/W&B,
  the mesh, kernel choice, remat, layer scanning, `train.grad_accum`): resume with the new settings (the
  same math; floating-point rounding may differ), saying which in one line.
- `train.steps` changed: extend (or shorten) the run. The learning-rate schedule keeps the horizon the
  run was started with (`optim.schedule_steps` is pinned to it in `config.json`), so steps past it run at
  the schedule's final rate; `--set optim.schedule_steps=N` stretches the schedule to N steps instead.
  One line says which, with the rates. An extension that would train at a final rate of 0 is refused.
- anything else: `RunDirError` naming each changed key (`model.init.hidden_size: 128 -> 64`) and the two
  ways on (a new `train.run_dir`, or `--allow-config-change`, which keeps the old config as
  `config.<n>.json`), and nothing is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax

from polmjax import config as config_lib
from polmjax.errors import UserError
from polmjax.train.optim import make_schedule

log = logging.getLogger("polmjax")

# Keys (or key prefixes ending in ".") that change how a run executes, not what it computes.
EXECUTION_KEYS = (
    "train.run_dir", "train.log_every", "train.eval_every", "train.eval_batches", "train.save_every",
    "train.keep", "train.async_save", "train.export_hf", "train.tensorboard", "train.wandb_project",
    "train.sample_prompts", "train.max_new_tokens", "train.grad_accum", "mesh.",
    "model.remat", "model.scan_layers", "model.attention_impl", "model.logprob_impl",
    "model.init.remat", "model.init.scan_layers", "model.init.attention_impl", "model.init.logprob_impl",
    "model.init.kernel_interpret",
)
_SCHEDULE_KEYS = ("train.steps", "optim.schedule_steps")


class RunDirError(UserError):
    """A command whose config does not continue the run already in its run directory."""


def prepare(exp: Any, *, allow_config_change: bool = False) -> Any:
    """Check `exp` against the run in `exp.train.run_dir` (see the module docstring); write `config.json`.

    Returns the experiment to run: `exp`, or `exp` with `optim.schedule_steps` pinned when extending.
    """
    run_dir = exp.train.run_dir
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        _write(exp, path)
        return exp
    saved = _load_saved(path, exp)
    if allow_config_change:
        changed = _diff(_flat(saved), _flat(exp))
        if changed:
            kept = _keep_old(path)
            log.warning("%s: config changed with --allow-config-change (%s); the old config is kept as %s",
                        run_dir, _describe(changed), kept)
            _write(exp, path)
        return exp

    old, new = _flat(saved), _flat(exp)
    old_horizon = saved.optim.horizon(saved.train.steps)
    new_horizon = exp.optim.horizon(exp.train.steps) if exp.optim.schedule_steps else old_horizon
    changed = _diff(old, new)
    refused = {k: v for k, v in changed.items() if not _is_execution(k) and k not in _SCHEDULE_KEYS}
    if refused:
        raise RunDirError(
            f"{run_dir} holds a run with a different config: {_describe(refused)}",
            hint=f"to continue that run, drop the changed --set; to start another, pass a new run directory "
                 f"(--set train.run_dir={run_dir.rstrip('/')}_2); to reuse this one anyway, add "
                 "--allow-config-change (its checkpoints must still fit the new model and optimizer)")
    done = _latest_checkpoint_step(run_dir)
    if exp.train.steps < done:
        raise RunDirError(f"{run_dir}: train.steps={exp.train.steps} is below the step the run has reached "
                          f"({done})", hint=f"export an earlier checkpoint with `polmjax export {run_dir} "
                                            f"--step N`, or pass train.steps >= {done}")
    schedule_note = ""
    if exp.train.steps != saved.train.steps or new_horizon != old_horizon:
        exp = dataclasses.replace(exp, optim=dataclasses.replace(exp.optim, schedule_steps=new_horizon))
        schedule_note = _schedule_note(saved, exp, old_horizon, new_horizon, done)
    execution = {k: v for k, v in changed.items() if _is_execution(k)}
    if execution:
        log.info("%s: resuming with changed execution settings: %s", run_dir, _describe(execution))
    if schedule_note:
        log.info("%s", schedule_note)
    if execution or schedule_note:
        _write(exp, path)
    return exp


def _schedule_note(saved, exp, old_horizon: int, new_horizon: int, done: int) -> str:
    """One line on what a changed train.steps / optim.schedule_steps does to the learning rate."""
    run_dir, old_steps, steps = exp.train.run_dir, saved.train.steps, exp.train.steps
    verb = "extending" if steps > old_steps else "shortening" if steps < old_steps else "continuing"
    head = f"{run_dir}: {verb} the run from {old_steps} to {steps} steps"
    if new_horizon == old_horizon:
        if steps <= old_horizon:
            return f"{head}; the learning-rate schedule keeps its {old_horizon}-step horizon"
        final = float(make_schedule(saved.optim, old_horizon)(old_horizon))
        if final == 0.0:
            raise RunDirError(
                f"{head} would train steps {old_horizon + 1}-{steps} at learning rate 0: the schedule "
                f"({saved.optim.schedule}, optim.min_lr_ratio={saved.optim.min_lr_ratio}) ends at 0 after "
                f"its {old_horizon}-step horizon",
                hint=f"stretch the schedule over the new length: --set optim.schedule_steps={steps}")
        return (f"{head}; the learning-rate schedule keeps its {old_horizon}-step horizon, so steps "
                f"{old_horizon + 1}-{steps} train at its final rate {final:.2e} (to stretch the schedule "
                f"over {steps} steps instead: --set optim.schedule_steps={steps})")
    before = float(make_schedule(saved.optim, old_horizon)(done))
    after = float(make_schedule(exp.optim, new_horizon)(done))
    return (f"{head}; the learning-rate schedule is re-spanned from {old_horizon} to {new_horizon} steps: "
            f"the rate at step {done + 1} changes from {before:.2e} to {after:.2e}")


def _load_saved(path: str, exp: Any) -> Any:
    with open(path) as f:
        saved_type = json.load(f).get("_type", "?")
    want = f"{type(exp).__module__}:{type(exp).__qualname__}"
    if saved_type != want:
        raise RunDirError(f"{path} holds a {saved_type.split(':')[-1]} run; this command starts a "
                          f"{type(exp).__name__}", hint="pass another train.run_dir")
    try:
        return config_lib.load_run_config(os.path.dirname(path))
    except Exception as e:  # a hand-edited or foreign file
        raise RunDirError(f"{path} cannot be read as a {type(exp).__name__} ({type(e).__name__}: {e})",
                          hint="pass another train.run_dir, or fix or move that file") from e


def _flat(cfg: Any) -> dict[str, Any]:
    """{"train.steps": 400, ...}; nested dataclasses flattened, other values (lists, None) kept whole."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            out[prefix[:-1]] = value

    walk("", config_lib.to_dict(cfg))
    return out


def _diff(old: dict, new: dict) -> dict[str, tuple[str, str]]:
    """{key: (old, new)} as JSON text for every key whose value differs. A section that appears or
    disappears (`lora: null -> {...}`) is reported once, under its name."""
    changed = {}
    for k in sorted(set(old) | set(new)):
        if k in old and k in new:
            if old[k] != new[k]:
                changed[k] = (json.dumps(old[k]), json.dumps(new[k]))
            continue
        section = k.rsplit(".", 1)[0]
        changed[section] = ("null" if old.get(section, 0) is None else "{...}",
                            "null" if new.get(section, 0) is None else "{...}")
    return changed


def _describe(changed: dict[str, tuple[str, str]]) -> str:
    return "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())


def _is_execution(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in EXECUTION_KEYS)


def _latest_checkpoint_step(run_dir: str) -> int:
    ckpt = os.path.join(run_dir, "checkpoints")
    steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
    return max(steps, default=0)


def _keep_old(path: str) -> str:
    n = 1
    while os.path.exists(kept := path.replace("config.json", f"config.{n}.json")):
        n += 1
    if jax.process_index() == 0:
        os.replace(path, kept)
    return kept


def _write(exp: Any, path: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        config_lib.dump(exp, path)
