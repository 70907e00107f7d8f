"""Orbax checkpoints that never lose a run: save, resume onto any mesh, survive broken checkpoints.

    ckpt = Checkpointer(run_dir / "checkpoints", save_every=100, keep=3)
    if (restored := ckpt.restore(abstract_state)) is not None:
        step, state, extra = restored           # arrays land directly on abstract_state's shardings
    ...
    ckpt.save(step, state, extra={"data": loader_position})   # every step; saves when due
    ckpt.close()

A step directory holds three Orbax items: `state` (the pytree, `StandardSave`: OCDBT + zarr),
`extra` (the caller's JSON dict: data position, notes) and `integrity` (one fingerprint per array,
written at save time and checked at restore, because Orbax restores a checkpoint with a flipped byte
in its array data without any error; see `_fingerprints`).

A broken newest checkpoint costs the steps since the previous one, never the run. Orbax's own listing
(`all_steps()`) excludes only unfinished `<step>.orbax-checkpoint-tmp` directories; a committed step
directory whose files were later deleted, truncated or garbled is still listed. So `restore()` tries
the steps newest first, warns for each one it cannot read (naming step and reason) and returns the
first that restores and matches its fingerprints. Steps it skipped are moved aside to
`<step>.unreadable` at the next save, since Orbax would otherwise keep them as the "newest" ones
(deleting good checkpoints under `keep`) and refuse to save their step numbers again.

Typed PRNG keys (`jax.random.key`) are saved and restored as they are (Orbax 0.12 handles them); no
`key_data` conversion is needed. Multi-host: every process calls `save`/`restore` (Orbax writes each
process's shards and synchronises); hosts agree on which step was restored.
"""

from __future__ import annotations

import gc
import json
import logging
import signal
import threading
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax import lax

from polmjax.errors import UserError

log = logging.getLogger(__name__)

_HANDLERS = {
    "state": ocp.StandardCheckpointHandler,
    "extra": ocp.JsonCheckpointHandler,
    "integrity": ocp.JsonCheckpointHandler,
}
_INTEGRITY_VERSION = 1
_UNREADABLE_SUFFIX = ".unreadable"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint directory holds no usable checkpoint, or a save could not be written."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose tree (paths, shapes) differs from the state asked for: a config
    mismatch (the run was written by another model or optimizer config), not a damaged checkpoint."""


class Checkpointer:
    """Periodic (async) Orbax checkpoints of a training state plus a JSON dict, with fallback on restore.

    Args:
      directory: where step directories go (local path or `gs://...`); created if missing.
      save_every: `save(step, ...)` writes when `step % save_every == 0` (or `force=True`).
      keep: how many newest checkpoints to keep; older ones are deleted after each save. None keeps all.
      async_save: write in a background thread; `save` returns once arrays are copied to host.
      verify: write per-array fingerprints and check them on restore (one fused reduction per array
        on device at each save and restore; catches silently garbled array data).
    """

    def __init__(self, directory: str | epath.PathLike, save_every: int = 100, keep: int | None = 3,
                 async_save: bool = True, verify: bool = True):
        if not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"Checkpointer: save_every must be an int >= 1, got {save_every!r}")
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise ValueError(f"Checkpointer: keep must be an int >= 1 or None (keep all), got {keep!r}")
        self.directory = epath.Path(directory)
        self.save_every, self.keep, self.async_save, self.verify = save_every, keep, async_save, verify
        self._skipped: dict[int, str] = {}  # step -> why restore() could not use it
        self._readable: set[int] = set()  # steps whose metadata latest_step() has read
        _warn_unfinished_saves(self.directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=save_every,
            enable_async_checkpointing=async_save,
            # Unfinished `<step>.orbax-checkpoint-tmp` dirs are saves killed mid-write: never
            # restorable, possibly large. Orbax removes them (primary host, in the background).
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={name: handler() for name, handler in _HANDLERS.items()},
        )

    def latest_step(self) -> int | None:
        """The newest step that is complete and whose metadata and JSON items read back, or None.

        Waits for a pending async save first. This check reads no array data (cheap on any model
        size), so a step whose array files are damaged is reported here until `restore()` has tried
        it; after that it is excluded. `restore()` is the final word.
        """
        self.wait()
        self._manager.reload()
        for step in sorted(self._manager.all_steps(), reverse=True):
            if step in self._skipped:
                continue
            reason = None if step in self._readable else self._metadata_problem(step)
            if reason is None:
                self._readable.add(step)  # committed steps do not change; read each one once
                return step
            log.warning("checkpoint step %d in %s is unreadable (%s); looking at the previous one",
                        step, self.directory, reason)
        return None

    def save(self, step: int, state: Any, extra: Mapping[str, Any] | None = None,
             force: bool = False) -> bool:
        """Save `state` (pytree of jax/numpy arrays and scalars) and `extra` (JSON dict) at `step`.

        Writes when `step % save_every == 0` or `force`; returns whether it wrote. A step that is
        already saved is not written again (returns False): e.g. a preemption right after resuming.
        With async saves this returns once the arrays are on host (so the next train step may donate
        them); the previous async save is waited for first. Call it on every process.
        """
        if not force and step % self.save_every:
            return False
        extra = {} if extra is None else dict(extra)
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as e:
            raise TypeError(f"Checkpointer.save(step={step}): extra must be a JSON-serialisable dict "
                            f"(put arrays in state instead): {e}") from e
        self._move_aside_skipped()
        existing = self._manager.all_steps()
        if step in existing:
            log.debug("checkpoint step %d already exists in %s; not saving it again", step, self.directory)
            return False
        if existing and step < max(existing):
            log.warning("saving step %d into %s which already holds newer step %d; keep=%s keeps the "
                        "highest steps, so this one may be deleted at once", step, self.directory,
                        max(existing), self.keep)
        items = {"state": ocp.args.StandardSave(state), "extra": ocp.args.JsonSave(extra)}
        if self.verify:
            try:
                leaves = _fingerprints(state)
            except Exception as e:  # never lose a save over its integrity record
                log.warning("could not fingerprint the state at step %d (%s); saving it without an "
                            "integrity record", step, _short(e))
            else:
                items["integrity"] = ocp.args.JsonSave({"version": _INTEGRITY_VERSION, "leaves": leaves})
        try:
            # The decision is ours (above); force=True stops Orbax from re-deciding with its own
            # policies (it would also save the first step of a run and refuse steps below a newer one).
            return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))
        except Exception as e:
            raise CheckpointError(f"saving checkpoint step {step} to {self.directory} failed: "
                                  f"{_short(e)}") from e

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict] | None:
        """Restore the newest readable checkpoint as `(step, state, extra)`; None if there is none.

        With `step`, restore exactly that step (no fallback): CheckpointError if it is absent or unreadable.

        `abstract_state` has the saved pytree structure with `jax.ShapeDtypeStruct` leaves carrying
        `.sharding` (e.g. `jax.eval_shape(init)` with the target shardings): arrays are read straight
        onto those shardings, so the mesh may differ from the one saved from. A leaf without
        `.sharding` is restored with the saved sharding (needs the same devices). Numpy arrays and
        Python scalars in `abstract_state` restore as such.

        A checkpoint that cannot be read (missing or truncated files, unreadable metadata, data that
        fails its fingerprint) is skipped with a warning naming the step and reason, and the previous
        one is tried. Raises CheckpointError when none is readable, listing each step and why.
        A step whose saved tree (read from its metadata, before any array) differs from
        `abstract_state` raises CheckpointMismatchError naming the paths and shapes that differ: that
        is a config mismatch, not damage, so nothing is skipped or moved aside.
        """
        self.wait()
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no checkpoint step {step} in {self.directory}; available: {sorted(steps)}")
            result, reason = self._try_restore(step, abstract_state)
            if reason is not None:
                raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable: {reason}")
            return result
        if not steps:
            return None
        tried: list[tuple[int, str]] = []
        for step in steps:
            result, reason = self._try_restore(step, abstract_state)
            if reason is not None:
                _collect_abandoned_coroutines()
            if not _all_processes(reason is None):
                reason = reason or "another process could not read it"
            if reason is None:
                self._skipped = dict(tried)
                return result
            log.warning("checkpoint step %d in %s is unreadable (%s); falling back to the previous one",
                        step, self.directory, reason)
            tried.append((step, reason))
        listing = "\n".join(f"  step {s}: {r}" for s, r in tried)
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}; tried, newest first:\n{listing}",
            hint="move the broken step directories away (or use a fresh directory) to start over")

    def wait(self) -> None:
        """Block until a pending async save is committed; raises CheckpointError if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"async checkpoint save into {self.directory} failed: {_short(e)}") from e

    def close(self) -> None:
        """Wait for pending saves and release Orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- private ------------------------------------------------------------------------------------

    def _try_restore(self, step: int, abstract_state: Any) -> tuple[tuple | None, str | None]:
        """((step, state, extra), None) if `step` restores and verifies, else (None, reason).

        Raises CheckpointMismatchError, before reading any array, if the saved tree differs."""
        mismatch = self._structure_mismatch(step, abstract_state)
        if mismatch:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {self.directory} does not fit the state being restored "
                f"({mismatch})",
                hint="the run was written with another model or optimizer config: use that config "
                     "(the run directory's config.json), or another run directory")
        has_integrity = (self._step_dir(step) / "integrity").exists()
        items = {"state": ocp.args.StandardRestore(abstract_state), "extra": ocp.args.JsonRestore()}
        if has_integrity:
            items["integrity"] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax/TensorStore raise many types for damaged files
            return None, _short(e)
        state, extra = restored["state"], restored["extra"]
        if self.verify and has_integrity:
            try:
                bad = _fingerprint_mismatches((restored["integrity"] or {}).get("leaves", {}), state)
            except Exception as e:
                log.warning("could not verify checkpoint step %d against its fingerprints (%s); "
                            "using it unverified", step, _short(e))
                bad = []
            if bad:
                return None, (f"array data differs from the fingerprint written at save time for "
                              f"{len(bad)} array(s): {', '.join(bad[:5])} (garbled data files)")
        return (step, state, dict(extra or {})), None

    def _metadata_problem(self, step: int) -> str | None:
        """Why `step`'s metadata or JSON items cannot be read, or None if they can."""
        items = {"extra": ocp.args.JsonRestore()}
        if (self._step_dir(step) / "integrity").exists():
            items["integrity"] = ocp.args.JsonRestore()
        try:
            self._manager.item_metadata(step)["state"]
            self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            return _short(e)
        return None

    def _structure_mismatch(self, step: int, abstract_state: Any) -> str | None:
        """Differences between `abstract_state` and the saved tree (paths, shapes), if readable.

        Used only to classify a failed restore: a readable, different structure is the caller's error.
        """
        try:
            saved = self._manager.item_metadata(step)["state"]
            saved = getattr(saved, "tree", saved)
        except Exception:
            return None
        if not saved:
            return None
        want = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
        have = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]}
        missing, unexpected = sorted(have.keys() - want.keys()), sorted(want.keys() - have.keys())
        problems = []
        if missing:
            problems.append(f"saved but not in abstract_state: {missing[:5]}")
        if unexpected:
            problems.append(f"in abstract_state but not saved: {unexpected[:5]}")
        for path in sorted(want.keys() & have.keys()):
            w, h = getattr(want[path], "shape", None), getattr(have[path], "shape", None)
            dtype = getattr(want[path], "dtype", None)
            is_key = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
            if w is not None and h is not None and tuple(w) != tuple(h) and not is_key:  # keys are
                # stored as their key_data, with a trailing dimension
                problems.append(f"{path}: saved shape {tuple(h)}, abstract_state shape {tuple(w)}")
        return "; ".join(problems[:6]) or None

    def _move_aside_skipped(self) -> None:
        """Rename steps that restore() skipped to `<step>.unreadable` (primary process), then reload.

        They are newer than the restored step, so Orbax would treat them as the newest checkpoints:
        `keep` would delete good ones first and their step numbers could not be saved again.
        """
        if not self._skipped:
            return
        self.wait()
        if jax.process_index() == 0:
            for step, reason in sorted(self._skipped.items()):
                src = self._step_dir(step)
                if not src.exists():
                    continue
                dst, n = self.directory / f"{src.name}{_UNREADABLE_SUFFIX}", 0
                while dst.exists():
                    n += 1
                    dst = self.directory / f"{src.name}{_UNREADABLE_SUFFIX}-{n}"
                try:
                    src.rename(dst)
                    log.warning("moved unreadable checkpoint step %d aside to %s (%s)", step, dst, reason)
                except Exception as e:  # e.g. object stores without directory rename
                    log.warning("could not move unreadable checkpoint %s aside (%s); Orbax may count it "
                                "among the newest `keep` checkpoints: move or delete it by hand", src, e)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("polmjax.checkpoint.move_aside")
        self._skipped = {}
        self._manager.reload()

    def _step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)


class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a flag that the training loop polls, so it can save and exit cleanly.

        with PreemptionGuard() as guard:
            for step in ...:
                state = train_step(state, batch)
                ckpt.save(step, state, extra=...)
                if guard.should_stop(step):       # single process: same as guard.requested
                    ckpt.save(step, state, extra=..., force=True); ckpt.wait(); break

    A second SIGINT while a stop is already requested raises KeyboardInterrupt at once, so a person
    can still kill a run that hangs while saving. `close()` puts the previous handlers back.

    Multi-host: hosts must stop at the same step or the next collective hangs, and a preemption
    notice reaches hosts at different times. So with more than one process `should_stop(step)` asks
    JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`; cheap: a mutex and
    a compare until a notice arrives, then the coordination service picks max step + 1 for all hosts;
    asking twice for one step gives the same answer, and Orbax's own save asks it too).
    JAX's preemption notifier owns SIGTERM there (a C handler that a Python handler would silently
    replace), so this guard then leaves SIGTERM alone and handles SIGINT only. If JAX's preemption
    service is off, hosts instead agree through an allgather of the local flag, one small collective
    per `should_stop` call. So multi-host loops must use `should_stop(step)`; `requested` is this
    process's own flag. Create the guard in the main thread (Python's signal rule) and after
    `jax.distributed.initialize` (it asks `jax.process_count()`, which starts the backend).
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be created in the main thread (Python only lets "
                               "the main thread install signal handlers)")
        self._requested = False
        self._signal: int | None = None
        self._logged = False
        self._use_sync_point = jax.process_count() > 1 and _jax_preemption_service_running()
        self._previous: dict[int, Any] = {}
        for sig in signals:
            if sig == signal.SIGTERM and self._use_sync_point:
                continue  # JAX's notifier handles it; see the class docstring
            self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def requested(self) -> bool:
        """True once this process received one of the signals."""
        if self._requested and not self._logged:
            self._logged = True  # logged here, not in the handler: writing to stderr there can raise
            log.warning("received %s: stopping after this step (save, wait, exit); send SIGINT again "
                        "to interrupt now", signal.Signals(self._signal).name)
        return self._requested

    def should_stop(self, step: int) -> bool:
        """Whether the loop should save and stop after `step`; the same answer on every process.

        Call it once per step on every process, with the same step numbers.
        """
        if jax.process_count() == 1:
            return self.requested
        if self._use_sync_point:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return not _all_processes(not self.requested)

    def close(self) -> None:
        """Put back the handlers that were installed before this guard."""
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) != self._handle:
                log.warning("PreemptionGuard.close: the %s handler was replaced by someone else; leaving "
                            "it in place", signal.Signals(sig).name)
                continue
            # None means the previous handler was not installed from Python; the default is the
            # closest we can put back.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def __enter__(self) -> PreemptionGuard:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _handle(self, signum: int, frame: Any) -> None:
        if self._requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._requested = True
        self._signal = signum


# -- integrity fingerprints --------------------------------------------------------------------------
#
# h(x) = sum_i w_i * (2 i + 1)  mod 2^32, over the 32-bit words w of x's bytes in row-major order
# (8/16-bit elements widened, 64-bit split low/high). Any single flipped bit changes h (the weights
# are odd); it is exact integer arithmetic, so it does not depend on sharding or reduction order, and
# the numpy and jax versions agree (a numpy leaf may come back as a jax.Array).


def _fingerprints(tree: Any) -> dict[str, dict]:
    """{path: {dtype, shape, hash}} for every array and scalar leaf of `tree` whose dtype is hashable."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out: dict[str, dict] = {}
    device = [(p, x) for p, x in leaves if isinstance(x, jax.Array) and _word_kind(x.dtype)]
    for (path, x), h in zip(device, _device_hashes([x for _, x in device])):
        out[_path_str(path)] = {"dtype": str(x.dtype), "shape": list(x.shape), "hash": h}
    for path, x in leaves:
        if isinstance(x, jax.Array) or not isinstance(x, (np.ndarray, np.generic, int, float, bool)):
            continue
        x = np.asarray(x)
        if _word_kind(x.dtype):
            out[_path_str(path)] = {"dtype": str(x.dtype), "shape": list(x.shape), "hash": _hash_np(x)}
    return out


def _fingerprint_mismatches(saved: Mapping[str, dict], state: Any) -> list[str]:
    """Paths whose restored value hashes differently from save time (same dtype and shape only)."""
    now = _fingerprints(state)
    return [path for path, rec in saved.items()
            if path in now and now[path]["dtype"] == rec["dtype"] and now[path]["shape"] == rec["shape"]
            and now[path]["hash"] != rec["hash"]]


def _word_kind(dtype: Any) -> str | None:
    """How to turn this dtype into uint32 words: 'key', 'bool', 'u8'/'u16'/'u32'/'u64'; None: skip."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return "key"
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return "bool"
    if dtype.kind in "iu":
        bits = jnp.iinfo(dtype).bits
    elif dtype.kind == "f" or jnp.issubdtype(dtype, jnp.floating):
        bits = jnp.finfo(dtype).bits
    else:
        return None  # complex, strings, objects: not fingerprinted
    return f"u{bits}" if bits == dtype.itemsize * 8 and bits in (8, 16, 32, 64) else None


def _device_hashes(xs: list[jax.Array]) -> list[int]:
    if not xs:
        return []
    try:
        hashes = _hash_jax_all(xs)
    except Exception:  # e.g. leaves on different device sets cannot share one jit
        hashes = [_hash_jax_all([x])[0] for x in xs]
    return [int(np.asarray(h)) for h in hashes]


@jax.jit
def _hash_jax_all(xs: list[jax.Array]) -> list[jax.Array]:
    return [_hash_jax(x) for x in xs]


def _hash_jax(x: jax.Array) -> jax.Array:
    kind = _word_kind(x.dtype)
    if kind == "key":
        u = jax.random.key_data(x).astype(jnp.uint32)
    elif kind == "bool":
        u = x.astype(jnp.uint32)
    elif kind == "u64":
        v = lax.bitcast_convert_type(x, jnp.uint64)
        u = jnp.stack([(v & 0xFFFFFFFF).astype(jnp.uint32), (v >> 32).astype(jnp.uint32)], axis=-1)
    else:
        u = lax.bitcast_convert_type(x, jnp.dtype(kind.replace("u", "uint"))).astype(jnp.uint32)
    index, stride = jnp.zeros(u.shape, jnp.uint32), 1
    for d in reversed(range(u.ndim)):
        index = index + lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % 2**32)
        stride *= u.shape[d]
    return jnp.sum(u * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


def _hash_np(x: np.ndarray) -> int:
    kind = _word_kind(x.dtype)
    x = np.ascontiguousarray(x)
    if kind == "bool":
        u = x.astype(np.uint64)
    elif kind == "u64":
        v = x.view(np.uint64)
        u = np.stack([v & 0xFFFFFFFF, v >> np.uint64(32)], axis=-1)
    else:
        u = x.view(np.dtype(kind.replace("u", "uint"))).astype(np.uint64)
    u = u.reshape(-1)
    mask = np.uint64(0xFFFFFFFF)
    weights = (np.arange(u.size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)) & mask
    return int(((u * weights) & mask).sum(dtype=np.uint64) & mask)


# -- small helpers -----------------------------------------------------------------------------------


def _path_str(path: tuple) -> str:
    """'params/w/0': one spelling for dict keys, attributes and sequence indices (as Orbax stores them)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _short(e: BaseException, limit: int = 300) -> str:
    """'Type: first line of the message', trimmed: enough to tell what broke, short enough to log."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _all_processes(ok: bool) -> bool:
    """True when `ok` holds on every process (a small allgather when there are several)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.min(multihost_utils.process_allgather(np.array([int(ok)], np.int32))))


def _collect_abandoned_coroutines() -> None:
    """Free now, quietly, the coroutines a failed Orbax restore abandons.

    Otherwise the garbage collector frees them at some later moment with a "coroutine ... was never
    awaited" RuntimeWarning; if that moment falls inside `compile()` (an import), CPython 3.11 turns
    the warning into "SystemError: AST constructor recursion depth mismatch".
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        gc.collect()


def _jax_preemption_service_running() -> bool:
    try:
        from jax._src import distributed
        return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


def _warn_unfinished_saves(directory: epath.Path) -> None:
    """Warn about saves that were killed mid-write; Orbax ignores (and we let it remove) them."""
    try:
        names = ocp.path.step.tmp_checkpoints(directory)
    except Exception as e:  # listing is best effort; never block a run on it
        log.debug("could not list unfinished saves in %s: %s", directory, e)
        return
    for name in names:
        try:
            step = ocp.path.step.step_from_checkpoint_name(name)
        except ValueError:
            step = "?"
        log.warning("checkpoint step %s in %s is incomplete (save did not finish: %s); skipping it, "
                    "it will be removed", step, directory, name)

