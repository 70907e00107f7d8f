"""Rewards for RL on completions: verifiers, shaping terms, their weighted sum, and a process pool that
keeps a hanging or crashing verifier from stalling training.

A reward function has TRL's signature `fn(prompts, completions, **row_fields) -> list[float | None]`:
lists of strings and the dataset row's other fields as lists (e.g. `answer`, reasoning-gym's `entry`),
one value per completion; None means "does not apply" (NaN in the per-function array, left out of the
sum and the means). Built in:

- `math_reward`: the completion's final answer equals the gold `answer`, by `math-verify` (parse both,
  `verify(gold, prediction)`), or by the small built-in extractor (`\\boxed{}`, `#### 42`, `<answer>`,
  the last number; integers, decimals, fractions a/b and `\\frac{a}{b}` compared exactly) when
  math-verify is not installed;
- `exact_match_reward`: the stripped completion is exactly the gold `answer`;
- `format_reward`: `<think>...</think><answer>...</answer>` (DeepSeek-R1's template);
- `overlong_reward` / `overlong`: DAPO's soft over-length punishment, on token lengths;
- `reasoning_gym_reward`: a reasoning-gym task scored by the dataset's own `score_answer`.

`score(reward_fns, prompts, completions, row_fields, pool=...)` runs a list of `RewardFn` (function,
weight, name) and returns the per-function arrays, the weighted sum and metrics per function (mean, std,
timeouts, errors). Functions with `isolate=True` run in a `VerifierPool`, one call per completion, each
with a timeout: a call that hangs is killed with its worker (the worker is replaced), a call that raises
or kills its worker scores 0, and both are counted (`VerifierPool(batch_timeout_s=...)` also bounds
the whole batch). Cheap deterministic ones (`format_reward`, `overlong_reward`) and reward-model scores
(a function that runs the model on the device) run in-process with `isolate=False`.

The workers are started with "spawn" (or "forkserver"), never "fork": the parent has started JAX's
threads, and a forked copy of them can deadlock. This module and `polmjax.rl` do not import JAX, so
a worker starts in a fraction of a second. Functions sent to the pool must be picklable: module-level
functions, `functools.partial` of them, or instances of module-level classes. As with any spawn pool,
a script that creates one must guard its entry point with `if __name__ == "__main__":`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import pickle
import re
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Combination


@dataclasses.dataclass(frozen=True)
class RewardFn:
    """One reward term: `fn(prompts, completions, **row_fields) -> list[float | None]`, its weight in
    the sum, the name it is logged under (default: the function's name), and whether it runs in the
    verifier pool (one call per completion, with a timeout: `timeout_s`, else the pool's) or in-process
    on the whole batch."""

    fn: Callable[..., Sequence[float | None]]
    weight: float = 1.0
    name: str | None = None
    isolate: bool = True
    timeout_s: float | None = None

    @property
    def label(self) -> str:
        return self.name or _callable_name(self.fn)


@dataclasses.dataclass(frozen=True)
class Scores:
    """`total` [B] float32: Σ_k weight_k · reward_k (NaN terms left out); `per_fn`: name -> [B] float32
    (NaN where the function returned None, 0 where it failed); `metrics` (TRL's names): `reward`,
    `reward_std`, `rewards/{name}/mean|std` (over the values that are not None; std unbiased), and
    `rewards/{name}/timeouts|errors` (counts of calls); `errors`: name -> the first failure message."""

    total: np.ndarray
    per_fn: dict[str, np.ndarray]
    metrics: dict[str, float]
    errors: dict[str, str]


def score(reward_fns: Sequence[RewardFn], prompts: Sequence[str], completions: Sequence[str],
          row_fields: Mapping[str, Sequence[Any]] | None = None, *, pool: VerifierPool | None = None) -> Scores:
    """Score a batch of completions with every reward function; see the module docstring."""
    row_fields = dict(row_fields or {})
    B = len(completions)
    if len(prompts) != B:
        raise ValueError(f"score: {len(prompts)} prompts for {B} completions")
    for key, values in row_fields.items():
        if len(values) != B:
            raise ValueError(f"score: row field {key!r} has {len(values)} values for {B} completions")
    labels = [rf.label for rf in reward_fns]
    if len(set(labels)) != len(labels):
        raise ValueError(f"score: reward function names must be unique (give RewardFn a name=), got {labels}")
    values = {label: np.zeros(B, np.float32) for label in labels}
    timeouts = dict.fromkeys(labels, 0)
    errors = dict.fromkeys(labels, 0)
    messages: dict[str, str] = {}

    calls, owners, call_timeouts = [], [], []
    for rf, label in zip(reward_fns, labels):
        if rf.isolate:
            if pool is None:
                raise ValueError(f"score: reward function {label!r} has isolate=True and needs a VerifierPool "
                                 f"(pool=...), or set isolate=False to run it in-process without a timeout")
            for b in range(B):
                kwargs = {key: [vals[b]] for key, vals in row_fields.items()}
                calls.append((rf.fn, ([prompts[b]], [completions[b]]), kwargs))
                owners.append((label, b))
                call_timeouts.append(rf.timeout_s)
            continue
        try:
            out = _as_floats(rf.fn(list(prompts), list(completions), **row_fields), B)
        except Exception as e:  # a failing in-process function scores 0 for the whole batch
            errors[label] += B
            messages.setdefault(label, f"{type(e).__name__}: {e}")
        else:
            values[label][:] = out

    for (label, b), outcome in zip(owners, pool.run(calls, call_timeouts) if calls else []):
        if outcome.status == "timeout":
            timeouts[label] += 1
            messages.setdefault(label, outcome.message)
            continue
        if outcome.status == "ok":
            try:
                values[label][b] = _as_floats(outcome.value, 1)[0]
                continue
            except (TypeError, ValueError) as e:
                outcome = Outcome("error", None, f"{type(e).__name__}: {e}")
        errors[label] += 1
        messages.setdefault(label, outcome.message)

    for label, message in messages.items():
        log.warning("reward %s: %d errors, %d timeouts in a batch of %d; first: %s",
                    label, errors[label], timeouts[label], B, message)
    total = np.zeros(B, np.float32)
    metrics: dict[str, float] = {}
    for rf, label in zip(reward_fns, labels):
        total += np.nan_to_num(rf.weight * values[label], nan=0.0)
        finite = values[label][np.isfinite(values[label])]
        if finite.size:
            metrics[f"rewards/{label}/mean"] = float(finite.mean())
            metrics[f"rewards/{label}/std"] = _std(finite)
        metrics[f"rewards/{label}/timeouts"] = float(timeouts[label])
        metrics[f"rewards/{label}/errors"] = float(errors[label])
    metrics["reward"] = float(total.mean()) if B else 0.0
    metrics["reward_std"] = _std(total)
    return Scores(total, values, metrics, messages)


def _std(x: np.ndarray) -> float:
    """Unbiased, as TRL's logged reward stds (`nanstd`); 0 for fewer than two values."""
    return float(x.std(ddof=1)) if x.size > 1 else 0.0


def _as_floats(out, n: int) -> np.ndarray:
    out = list(out)
    if len(out) != n:
        raise ValueError(f"reward function returned {len(out)} values for {n} completions")
    return np.array([math.nan if v is None else float(v) for v in out], np.float32)


def _callable_name(fn) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


# ---------------------------------------------------------------------------------------------------
# Built-in reward functions


def math_reward(prompts, completions, answer=None, *, solution=None, backend: str = "auto",
                **_) -> list[float | None]:
    """1.0 if the completion's final answer equals the gold `answer` (or `solution`, TRL's and MATH's
    column name), else 0.0; None if the gold cannot be parsed (as TRL's `accuracy_reward`). A
    GSM8K-style gold ("...#### 42") is cut to what follows "####"; a MATH solution's `\\boxed{}` is
    found by either backend. `backend`: "math_verify", "builtin" (`builtin_verify`), or "auto" (math-verify when
    installed). math-verify parses the gold (bare LaTeX wrapped in `$...$`: `3\\sqrt{2}` alone parses as 3) and the
    completion's `final_answer_text` (after `</think>`, inside `<answer>`, the last `\\boxed{}`) with
    `extraction_mode="first_match"` and compares them symbolically and numerically.
    """
    if backend == "auto":
        backend = "math_verify" if _has_math_verify() else "builtin"
    if backend not in ("math_verify", "builtin"):
        raise ValueError(f"math_reward: backend={backend!r}; expected 'auto', 'math_verify' or 'builtin'")
    golds = answer if answer is not None else solution
    if golds is None:
        raise ValueError("math_reward: needs the gold answers as the row field 'answer' (or 'solution')")
    out: list[float | None] = []
    for completion, gold in zip(completions, golds, strict=True):
        gold = str(gold)
        if "####" in gold:
            gold = gold.rsplit("####", 1)[1].strip()
        if backend == "builtin":
            out.append(float(builtin_verify(gold, completion)))
            continue
        from math_verify import parse, verify

        latex = "\\" in gold and "$" not in gold  # bare LaTeX (MATH's answers): parsed as math, not text
        candidates = (f"${gold}$", gold) if latex else (gold, f"${gold}$")
        gold_parsed = next((g for g in (parse(c, extraction_mode="first_match") for c in candidates) if g), None)
        if not gold_parsed:
            out.append(None)
            continue
        out.append(float(verify(gold_parsed, parse(final_answer_text(completion), extraction_mode="first_match"))))
    return out


def final_answer_text(completion: str) -> str:
    """The part of a completion that states its final answer: after the last `</think>`, the last
    `<answer>...</answer>` if there is one, and of that the last `\\boxed{}` if there is one (so numbers
    in the reasoning, or an earlier boxed guess, are not taken for the answer)."""
    text = completion.rsplit("</think>", 1)[-1]
    tagged = _last_tag(text, "answer")
    text = text if tagged is None else tagged
    boxed = _last_boxed(text)
    return text if boxed is None else f"\\boxed{{{boxed}}}"


def exact_match_reward(prompts, completions, answer, **_) -> list[float]:
    """1.0 if the completion, stripped of surrounding whitespace, is exactly the gold `answer`, else 0.0
    (tasks with one right string, e.g. the toy tasks of `polmjax.data.toy`)."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


def format_reward(prompts, completions, **_) -> list[float]:
    """1.0 if the completion is exactly `<think>...</think>` then `<answer>...</answer>` (whitespace
    around the blocks allowed, no nested or repeated tags), else 0.0 (DeepSeek-R1, arXiv:2501.12948)."""
    return [1.0 if _FORMAT.fullmatch(c) else 0.0 for c in completions]


def overlong(lengths, max_len: int, buffer: int) -> np.ndarray:
    """DAPO's soft over-length punishment (Yu et al. 2025, arXiv:2503.14476, Eq. 13), float32 [B]:

        R(|y|) = 0                               |y| ≤ L_max − L_cache
                 ((L_max − L_cache) − |y|) / L_cache   L_max − L_cache < |y| ≤ L_max
                 −1                              |y| > L_max

    with L_max = `max_len` and L_cache = `buffer` (the paper: 20480 and 4096), lengths in tokens.
    """
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong: need 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    n = np.asarray(lengths, np.float64)
    start = max_len - buffer
    return np.where(n <= start, 0.0, np.where(n <= max_len, (start - n) / buffer, -1.0)).astype(np.float32)


def overlong_reward(prompts, completions, completion_lengths, *, max_len: int, buffer: int, **_) -> list[float]:
    """`overlong` as a reward function: bind `max_len` and `buffer` with functools.partial and pass the
    completions' token counts as the row field `completion_lengths`."""
    return overlong(completion_lengths, max_len, buffer).tolist()


def reasoning_gym_reward(prompts, completions, entry, *, tag: str = "answer", **_) -> list[float]:
    """A reasoning-gym task's own score, `score_answer(answer, entry)`, of the dataset named in
    `entry["metadata"]["source_dataset"]`; `entry` is the dataset item (the row field). The answer is
    the content of the last `<answer>...</answer>` (`tag`) in the completion, or the whole completion
    stripped when it has none."""
    out = []
    for completion, item in zip(completions, entry, strict=True):
        answer = _last_tag(completion, tag)
        answer = completion.strip() if answer is None else answer
        out.append(float(_reasoning_gym_scorer(item["metadata"]["source_dataset"])(answer, item)))
    return out


@functools.cache
def _reasoning_gym_scorer(name: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(name)


@functools.lru_cache(maxsize=1)
def _has_math_verify() -> bool:
    try:
        importlib.import_module("math_verify")
    except ImportError:
        return False
    return True


_FORMAT = re.compile(r"\s*<think>(?:(?!</?think>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>\s*", re.DOTALL)


# ---------------------------------------------------------------------------------------------------
# Built-in answer extraction (used when math-verify is absent)

_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+"
_FRAC = r"-?\\[dt]?frac\s*\{\s*(?:" + _NUMBER + r")\s*\}\s*\{\s*(?:" + _NUMBER + r")\s*\}"
_ANY_NUMBER = re.compile(rf"{_FRAC}|(?:{_NUMBER})(?:\s*/\s*(?:{_NUMBER}))?")
_WHOLE_FRAC = re.compile(r"(-?)\\[dt]?frac\s*\{\s*(" + _NUMBER + r")\s*\}\s*\{\s*(" + _NUMBER + r")\s*\}")
_WHOLE_RATIO = re.compile(rf"({_NUMBER})\s*/\s*({_NUMBER})")


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: the last `\\boxed{...}`, else what follows the last `####`
    (GSM8K), else the last `<answer>...</answer>`, else the last number or fraction; None if none."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().splitlines()
        if tail and tail[0].strip():
            return tail[0].strip()
    tagged = _last_tag(text, "answer")
    if tagged:
        return tagged
    numbers = _ANY_NUMBER.findall(text)
    return numbers[-1].strip() if numbers else None


def builtin_verify(gold: str, completion: str) -> bool:
    """True if the completion's `extract_answer` equals `gold`: exactly as rational numbers when both
    are numbers (integers, decimals, `1,000`, a/b, `\\frac{a}{b}`; so 0.5 == 1/2), otherwise as strings
    after removing spaces, `$`, `\\text{}`, `\\left`/`\\right` and a final period."""
    predicted = extract_answer(completion)
    if predicted is None:
        return False
    gold_answer = extract_answer(gold) if (_last_boxed(gold) is not None or "####" in gold) else gold
    a, b = _as_number(gold_answer), _as_number(predicted)
    if a is not None and b is not None:
        return a == b
    return _normalise(gold_answer) == _normalise(predicted)


def _as_number(text: str) -> Fraction | None:
    s = _normalise(text)
    if m := _WHOLE_FRAC.fullmatch(s):
        num, den = Fraction(m.group(2).replace(",", "")), Fraction(m.group(3).replace(",", ""))
        return None if den == 0 else (-1 if m.group(1) else 1) * num / den
    if m := _WHOLE_RATIO.fullmatch(s):
        num, den = Fraction(m.group(1).replace(",", "")), Fraction(m.group(2).replace(",", ""))
        return None if den == 0 else num / den
    if re.fullmatch(_NUMBER, s):
        return Fraction(s.replace(",", ""))
    return None


def _normalise(text: str) -> str:
    s = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", text)
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\$|\s", "", s)
    return s.rstrip(".")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    start, depth = starts[-1], 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None


def _last_tag(text: str, tag: str) -> str | None:
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.DOTALL)
    return found[-1].strip() if found else None


# ---------------------------------------------------------------------------------------------------
# Verifier pool


class Outcome(NamedTuple):
    """One call's result: status "ok" (value is what the function returned), "error" or "timeout"."""

    status: str
    value: Any
    message: str


class VerifierPool:
    """Worker processes that run calls with a per-call timeout and survive hangs and crashes.

        with VerifierPool(num_workers=4, timeout_s=10.0) as pool:
            outcomes = pool.run([(fn, args, kwargs), ...])      # one Outcome per call, in order

    Calls run concurrently, one per worker. A call that has not answered `timeout_s` after it was sent
    (the pool's, or the call's own from `run`'s `timeout_s`: a number or one per call, None = the
    pool's) is a "timeout": its worker is killed (SIGKILL) and replaced. `batch_timeout_s` bounds a
    whole `run` (if every call hangs they queue behind `num_workers` workers): then the running calls
    are killed and those not started are timeouts too. A call that raises (any exception,
    SystemExit included) is an "error"; one whose worker dies (os._exit, a segfault, the OOM killer) is
    an "error" and the worker is replaced. The next call finds a full pool either way. `preload`
    names modules each worker imports before it takes calls (e.g. "math_verify"), so the first call's
    import time does not count against its timeout. Not thread-safe: one `run` at a time.
    """

    def __init__(self, num_workers: int = 2, *, timeout_s: float = 10.0, batch_timeout_s: float | None = None,
                 start_method: str = "spawn", preload: Sequence[str] = (), boot_timeout_s: float = 120.0):
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"VerifierPool: start_method={start_method!r}; use 'spawn' or 'forkserver' "
                             f"('fork' copies the parent's JAX threads and can deadlock)")
        if num_workers < 1 or not timeout_s > 0:
            raise ValueError(f"VerifierPool: need num_workers >= 1 and timeout_s > 0, got {num_workers}, {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.batch_timeout_s = None if batch_timeout_s is None else float(batch_timeout_s)
        self.boot_timeout_s = float(boot_timeout_s)
        self._ctx = multiprocessing.get_context(start_method)
        self._preload = tuple(preload)
        self._workers = [self._start() for _ in range(num_workers)]
        self.restarts = 0

    def run(self, calls: Sequence[tuple[Callable, tuple, dict]],
            timeout_s: float | Sequence[float | None] | None = None) -> list[Outcome]:
        if timeout_s is None or isinstance(timeout_s, (int, float)):
            timeout_s = [timeout_s] * len(calls)
        if len(timeout_s) != len(calls):
            raise ValueError(f"VerifierPool.run: {len(timeout_s)} timeouts for {len(calls)} calls")
        timeouts = [self.timeout_s if t is None else float(t) for t in timeout_s]
        if not self._workers:
            raise RuntimeError("VerifierPool.run: the pool is closed")
        payloads = []
        for fn, args, kwargs in calls:
            try:
                payloads.append(pickle.dumps((fn, tuple(args), dict(kwargs))))
            except Exception as e:
                raise ValueError(f"verifier {_callable_name(fn)!r} cannot be sent to a worker process ({e}); define "
                                 f"it at module level (not a lambda or closure) or run it with isolate=False") from e
        results: list[Outcome | None] = [None] * len(payloads)
        pending = collections.deque(range(len(payloads)))
        busy: dict[int, tuple[int, float]] = {}  # worker index -> (call index, deadline)
        end = math.inf if self.batch_timeout_s is None else time.monotonic() + self.batch_timeout_s
        while pending or busy:
            if pending and time.monotonic() >= end:
                for i in pending:
                    results[i] = Outcome("timeout", None, f"not started within the batch's {self.batch_timeout_s:g} s")
                pending.clear()
            for wi, worker in enumerate(self._workers):
                if pending and worker.ready and wi not in busy:
                    i = pending.popleft()
                    try:
                        worker.conn.send_bytes(payloads[i])
                    except OSError:  # it died while idle: replace it and give the call to the next one
                        pending.appendleft(i)
                        self._replace(wi, kill=True)
                        continue
                    busy[wi] = (i, min(time.monotonic() + timeouts[i], end))
            self._wait(busy, results, end)
            now = time.monotonic()
            for wi, (i, deadline) in list(busy.items()):
                if now >= deadline:
                    results[i] = Outcome("timeout", None, f"no answer within {timeouts[i]:g} s (or the batch's "
                                                          f"{self.batch_timeout_s} s): worker killed")
                    del busy[wi]
                    self._replace(wi, kill=True)
        return results

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send_bytes(b"")
            except OSError:
                pass
        for worker in self._workers:
            worker.process.join(timeout=2.0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()
        self._workers = []

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wait(self, busy: dict[int, tuple[int, float]], results: list, end: float) -> None:
        """Wait for answers (or ready signals of booting workers) until the nearest deadline."""
        watched = {id(w.conn): wi for wi, w in enumerate(self._workers) if wi in busy or not w.ready}
        if not watched:
            return
        now = time.monotonic()
        deadlines = [end] + [d for _, d in busy.values()]
        deadlines += [w.started + self.boot_timeout_s for w in self._workers if not w.ready]
        conns = [w.conn for w in self._workers if id(w.conn) in watched]
        for conn in multiprocessing.connection.wait(conns, timeout=max(0.0, min(deadlines) - now)):
            wi = watched[id(conn)]
            worker = self._workers[wi]
            try:
                status, value = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                worker.process.join(timeout=5.0)
                message = f"worker process died (exit code {worker.process.exitcode})"
                if wi not in busy:
                    raise RuntimeError(f"VerifierPool: a worker died while starting: {message}") from None
                i, _ = busy.pop(wi)
                results[i] = Outcome("error", None, message)
                self._replace(wi, kill=False)
                continue
            except Exception as e:  # the reply arrived whole but does not unpickle here
                status, value = "error", f"reply cannot be read: {type(e).__name__}: {e}"
            if status == "ready":
                worker.ready = True
            elif status == "boot_error":
                raise RuntimeError(f"VerifierPool: a worker could not start: {value}")
            else:
                i, _ = busy.pop(wi)
                results[i] = Outcome(status, value if status == "ok" else None, "" if status == "ok" else value)
        for worker in self._workers:
            if not worker.ready and time.monotonic() > worker.started + self.boot_timeout_s:
                raise RuntimeError(f"VerifierPool: a worker did not start within {self.boot_timeout_s:g} s "
                                   f"(preload={self._preload})")

    def _start(self) -> _Worker:
        conn, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, args=(child, self._preload), daemon=True,
                                    name="polmjax-verifier")
        process.start()
        child.close()
        return _Worker(process, conn, time.monotonic())

    def _replace(self, wi: int, kill: bool) -> None:
        worker = self._workers[wi]
        if kill and worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=5.0)
        worker.conn.close()
        self._workers[wi] = self._start()
        self.restarts += 1


@dataclasses.dataclass
class _Worker:
    process: Any
    conn: Any
    started: float
    ready: bool = False


def _worker_main(conn, preload: tuple[str, ...]) -> None:
    """A worker: import `preload`, say ready, then run pickled (fn, args, kwargs) calls until b"" or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills the workers
    try:
        for name in preload:
            importlib.import_module(name)
    except BaseException as e:
        conn.send_bytes(pickle.dumps(("boot_error", f"import {name}: {type(e).__name__}: {e}")))
        return
    conn.send_bytes(pickle.dumps(("ready", None)))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not data:
            return
        try:
            fn, args, kwargs = pickle.loads(data)
            reply = ("ok", fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - a verifier's failure, SystemExit included, is a score of 0
            reply = ("error", f"{type(e).__name__}: {e}")
        try:
            payload = pickle.dumps(reply)
        except Exception as e:
            payload = pickle.dumps(("error", f"result cannot be sent back: {type(e).__name__}: {e}"))
        conn.send_bytes(payload)
