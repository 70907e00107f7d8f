"""Run logging: console progress, metrics.jsonl, TensorBoard event files, optional W&B, and MFU.

`MetricsLogger(run_dir)` appends one JSON object per logged step to `metrics.jsonl` (with at least
`step` and `loss`) and writes the same scalars to `tensorboard/`. On resume, `truncate_after(step)`
drops lines logged after the restored checkpoint, so the file reads as one uninterrupted run.

On a terminal the console shows one live progress bar (step, loss, lr, tokens/s, ETA), advanced every
step by `tick`; elsewhere (a log file, CI) one plain line per logged step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time

log = logging.getLogger("polmjax")

# Dense bf16 peak FLOP/s per chip (vendor datasheets). Matched against jax.Device.device_kind.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
}


def device_peak_flops(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s of one device, or None when unknown (CPU)."""
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in device_kind.lower():
            return PEAK_FLOPS[name]
    return None


def train_flops_per_token(cfg, seq_len: int) -> float:
    """Analytic training FLOPs per token (forward + backward = 3x forward), as in the PaLM paper (App. B).

    6 * (matmul parameters, unembedding included) + 6 * L * H * K * seq_len for causal attention
    (QK^T and PV, each 2 FLOPs per multiply-add, averaged over a causal mask, times 3).
    """
    D, F, H, G, K, V, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim, cfg.vocab_size, cfg.num_layers)
    matmul_params = L * (D * K * (H + 2 * G) + H * K * D + 3 * D * F) + D * V
    return 6.0 * matmul_params + 6.0 * L * H * K * seq_len


class MetricsLogger:
    def __init__(self, run_dir: str, *, total_steps: int, use_tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict | None = None, is_writer: bool = True, console=sys.stderr, progress: bool | None = None):
        """progress: a live bar on `console` (default: when it is a terminal) instead of plain lines."""
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.is_writer = is_writer
        self.console = console
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        self._wandb = None
        self._start = None
        self._start_step = 0
        self._bar = None
        self._progress = (hasattr(console, "isatty") and console.isatty()) if progress is None else progress
        if not is_writer:
            return
        os.makedirs(run_dir, exist_ok=True)
        if use_tensorboard:
            self._tb = _EventWriter(os.path.join(run_dir, "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("wandb_project=%s but wandb is not installed; skipping W&B", wandb_project)
            else:
                self._wandb = wandb.init(project=wandb_project, config=config, dir=run_dir, resume="allow")

    def truncate_after(self, step: int) -> None:
        """Keep only lines with step <= `step` (a resumed run re-logs what came after its checkpoint)."""
        if not self.is_writer or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(lines)

    def start(self, step: int) -> None:
        self._start, self._start_step = time.perf_counter(), step
        if self._progress and self.is_writer:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, initial=step, file=self.console, smoothing=0.1, desc="train",
                             bar_format="{desc} {n_fmt}/{total_fmt} |{bar:20}| [{elapsed}<{remaining}]{postfix}")

    def tick(self, step: int) -> None:
        """Step `step` is done: advance the progress bar (no-op without one)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def log(self, step: int, metrics: dict, *, split: str = "train") -> None:
        row = {"step": int(step), **({} if split == "train" else {"split": split}),
               **{k: _scalar(v) for k, v in metrics.items()}}
        if not self.is_writer:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "split") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.scalar(f"{split}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in row.items() if k != "step"}, step=step)
        self._console(row, split)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()

    def _console(self, row: dict, split: str) -> None:
        step = row["step"]
        fields = [(key.replace("_per_s", "/s").replace("learning_rate", "lr"), fmt.format(row[key]))
                  for key, fmt in (("loss", "{:.4f}"), ("learning_rate", "{:.2e}"), ("grad_norm", "{:.3f}"),
                                   ("tokens_per_s", "{:,.0f}"), ("mfu", "{:.1%}"))
                  if key in row and isinstance(row[key], (int, float))]
        if self._bar is not None:
            if split == "train":
                self._bar.set_postfix_str("  ".join(f"{k} {v}" for k, v in fields), refresh=True)
            else:
                self._bar.write(f"{split} step {step}/{self.total_steps}  " + "  ".join(f"{k} {v}" for k, v in fields),
                                file=self.console)
            return
        parts = [f"{split} step {step}/{self.total_steps}"] + [f"{k} {v}" for k, v in fields]
        if split == "train" and self._start is not None and step > self._start_step:
            elapsed = time.perf_counter() - self._start
            eta = elapsed / (step - self._start_step) * (self.total_steps - step)
            done = int(20 * step / max(self.total_steps, 1))
            parts.insert(0, "[" + "#" * done + "." * (20 - done) + "]")
            parts.append(f"eta {_hms(eta)}")
        print("  ".join(parts), file=self.console, flush=True)


def _scalar(v):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if isinstance(v, int) else f


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _EventWriter:
    """TensorBoard scalar summaries through tensorboard's own event-file writer (no TensorFlow needed)."""

    def __init__(self, logdir: str):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        os.makedirs(logdir, exist_ok=True)
        self._writer = EventFileWriter(logdir)
        self._Event, self._Summary = Event, Summary

    def scalar(self, tag: str, value: float, step: int) -> None:
        summary = self._Summary(value=[self._Summary.Value(tag=tag, simple_value=float(value))])
        self._writer.add_event(self._Event(wall_time=time.time(), step=int(step), summary=summary))

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
