"""The one training loop every algorithm uses: resume, step, log, evaluate, checkpoint, preemption.

The algorithm supplies a jitted `step_fn(state, batch) -> (state, metrics)` and an iterator of host
batches with `get_state`/`set_state`; the loop owns everything else. Resuming restores params,
optimizer, step, RNG (all in the state) and the data position (checkpoint `extra`), and drops metrics
lines logged after the checkpoint, so a killed-and-restarted run writes the same `metrics.jsonl`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import jax

from polmjax.checkpoint import Checkpointer, PreemptionGuard
from polmjax.logging import MetricsLogger

log = logging.getLogger("polmjax")


@dataclass
class LoopResult:
    state: object
    step: int
    preempted: bool


def train_loop(
    *,
    state,
    step_fn: Callable,
    batches,
    put_batch: Callable,
    total_steps: int,
    checkpointer: Checkpointer,
    logger: MetricsLogger,
    log_every: int = 10,
    eval_every: int = 0,
    eval_fn: Callable | None = None,
    tokens_per_step: int = 0,
    flops_per_step: float = 0.0,
    peak_flops: float | None = None,
) -> LoopResult:
    """Run `step_fn` until `total_steps`, resuming from the newest readable checkpoint if there is one."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = checkpointer.restore(abstract)
    if restored is not None:  # the checkpoint's step: loop steps (an RL step may hold several updates)
        step, state, extra = restored
        batches.set_state(extra["data"])
        logger.truncate_after(step)
        log.info("resumed from step %d", step)
    else:
        logger.truncate_after(0)  # a run killed before its first checkpoint starts over
        step = int(jax.device_get(state.step))
    logger.start(step)
    guard = PreemptionGuard()
    last_time, last_step = time.perf_counter(), step
    try:
        while step < total_steps:
            state, metrics = step_fn(state, put_batch(next(batches)))
            step += 1
            logger.tick(step)
            if step % log_every == 0 or step == total_steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                rate = (step - last_step) / max(now - last_time, 1e-9)
                if tokens_per_step:
                    metrics["tokens_per_s"] = rate * tokens_per_step
                if peak_flops and flops_per_step:
                    metrics["mfu"] = rate * flops_per_step / (peak_flops * jax.device_count())
                logger.log(step, metrics)
                last_time, last_step = time.perf_counter(), step
            if eval_fn is not None and eval_every and step % eval_every == 0:
                logger.log(step, eval_fn(state), split="eval")
            extra = {"data": batches.get_state()}
            checkpointer.save(step, state, extra=extra)
            if guard.should_stop(step):
                log.warning("preemption requested at step %d: saving and exiting", step)
                checkpointer.save(step, state, extra=extra, force=True)
                checkpointer.wait()
                return LoopResult(state, step, preempted=True)
        checkpointer.save(step, state, extra={"data": batches.get_state()}, force=True)
        checkpointer.wait()
        return LoopResult(state, step, preempted=False)
    finally:
        guard.close()
