"""Checkpointer and PreemptionGuard: exact round trips across meshes, retention, fallback, signals."""

import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from polmjax import checkpoint as ckpt_lib
from polmjax.checkpoint import CheckpointError, Checkpointer, PreemptionGuard
from polmjax.mesh import make_mesh

# When a restore fails on a damaged checkpoint (on purpose here), TensorStore may call back into the
# asyncio loop that Orbax has already closed; harmless, reported as an unraisable exception.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(?s)Exception ignored in.*Event loop is closed:pytest.PytestUnraisableExceptionWarning")

REPO = pathlib.Path(__file__).resolve().parents[1]
LOGGER = "polmjax.checkpoint"


def _state(mesh, offset=0):
    """A train-state-like pytree: sharded f32/bf16/int arrays, a typed key array, numpy, scalars."""
    rng = np.random.RandomState(offset)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    return {
        "params": {
            "w": put(rng.randn(64, 64).astype(np.float32), P("fsdp", "tensor")),  # big enough to be
            # stored out of line in OCDBT data files (small arrays sit inside checksummed tree nodes)
            "e": put(jnp.asarray(rng.randn(16, 8), jnp.bfloat16), P("tensor", None)),
        },
        "opt": (put(np.arange(16, dtype=np.int32) + offset, P(("data", "fsdp"))),),
        "key": put(jax.random.split(jax.random.key(offset), 8), P("data")),
        "step": jnp.int32(offset),
        "host": np.arange(5, dtype=np.int64) + offset,
        "lr": 0.5 + offset,
    }


def _abstract(state, mesh, specs):
    """abstract_state for `state` with `specs[path]` shardings on `mesh` (None -> single device)."""
    def leaf(path, x):
        if not isinstance(x, jax.Array):
            return x
        spec = specs.get(jax.tree_util.keystr(path), P())
        sharding = SingleDeviceSharding(jax.devices()[0]) if mesh is None else NamedSharding(mesh, spec)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree_util.tree_map_with_path(leaf, state)


def _bits(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.asarray(x)
    return x.view(f"uint{x.dtype.itemsize * 8}") if x.dtype.kind in "fiu" else x


def _assert_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert isinstance(g, jax.Array) if isinstance(w, jax.Array) else type(g) is type(w), (g, w)
        np.testing.assert_array_equal(_bits(g), _bits(w))


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


# -- round trips ------------------------------------------------------------------------------------


def test_round_trip_onto_other_meshes_and_one_device(tmp_path):
    mesh = make_mesh(2, 2, 2)
    state = _state(mesh, offset=3)
    extra = {"data": {"shard": 2, "offset": 12345, "files": ["a.jsonl", "b.jsonl"]},
             "note": "héllo", "x": None}
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        assert ckpt.save(7, state, extra=extra)
        assert ckpt.latest_step() == 7

    targets = {
        "1x2x4": (make_mesh(1, 2, 4), {"['params']['w']": P(None, "tensor"), "['key']": P("tensor")}),
        "8x1x1": (make_mesh(8, 1, 1), {"['params']['e']": P("data", None), "['opt'][0]": P("data")}),
        "one device": (None, {}),
    }
    for name, (target_mesh, specs) in targets.items():
        abstract = _abstract(state, target_mesh, specs)
        with Checkpointer(tmp_path, save_every=1) as ckpt:
            step, restored, got_extra = ckpt.restore(abstract)
        assert step == 7 and got_extra == extra, name
        _assert_equal(restored, state)
        for r, a in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
            if isinstance(a, jax.ShapeDtypeStruct):
                assert r.sharding.is_equivalent_to(a.sharding, r.ndim), (name, r.sharding, a.sharding)


def test_no_checkpoint_returns_none(tmp_path):
    with Checkpointer(tmp_path / "fresh") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)}) is None


def test_save_every_force_and_keep(tmp_path):
    state = {"w": jnp.arange(4.0)}
    with Checkpointer(tmp_path, save_every=3, keep=2, async_save=False) as ckpt:
        saved = {step: ckpt.save(step, state) for step in range(1, 10)}
        assert [s for s, ok in saved.items() if ok] == [3, 6, 9]
        assert ckpt.save(10, state, force=True)
        assert not ckpt.save(10, state, force=True)  # already saved: not written twice
        assert ckpt.latest_step() == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "9"]


def test_async_save_then_wait_survives_donation(tmp_path):
    mesh = make_mesh(2, 2, 2)
    state = _state(mesh, offset=1)["params"]
    want = jax.tree.map(np.asarray, state)
    abstract = jax.eval_shape(lambda: state)
    bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    ckpt = Checkpointer(tmp_path, save_every=5, keep=3, async_save=True)
    assert ckpt.save(5, state, extra={"data": {"pos": 5}})
    saved, state = state, bump(state)  # the next train step donates the buffers being saved
    assert saved["w"].is_deleted()
    assert ckpt.save(10, state, extra={"data": {"pos": 10}})  # waits for the save of step 5 first
    state = bump(state)
    ckpt.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "5"]
    step, restored, extra = ckpt.restore(abstract)
    ckpt.close()
    assert step == 10 and extra == {"data": {"pos": 10}}
    _assert_equal(jax.tree.map(np.asarray, restored), jax.tree.map(lambda x: (x + 1).astype(x.dtype), want))
    with Checkpointer(tmp_path) as other:
        assert other.latest_step() == 10


def test_extra_must_be_json(tmp_path):
    with Checkpointer(tmp_path, save_every=1, async_save=False) as ckpt:
        with pytest.raises(TypeError, match="extra must be a JSON-serialisable"):
            ckpt.save(1, {"w": jnp.ones(2)}, extra={"rng": np.ones(2)})


# -- broken checkpoints -----------------------------------------------------------------------------


def _data_files(step_dir):
    """OCDBT data files of the state item (per-process databases and the root one, where small
    arrays are stored inline), smallest first."""
    return sorted((step_dir / "state").glob("**/d/*"), key=lambda p: p.stat().st_size)


def _unfinished_save(d):  # a save killed mid-write: Orbax's tmp dir of a newer step
    shutil.copytree(d / "2", d / "3.orbax-checkpoint-tmp")


def _files_deleted(d):
    for f in _data_files(d / "2"):
        f.unlink()


def _metadata_truncated(d):
    f = d / "2" / "state" / "_METADATA"
    f.write_bytes(f.read_bytes()[:40])


def _data_truncated(d):
    for f in _data_files(d / "2"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _data_garbled(d):  # one flipped bit in array data: Orbax restores it without error
    f = [f for f in _data_files(d / "2") if "process" in str(f)][-1]
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0x01
    f.write_bytes(bytes(b))


CORRUPTIONS = [_unfinished_save, _files_deleted, _metadata_truncated, _data_truncated, _data_garbled]


def _two_checkpoints(d):
    """Steps 1 and 2 of a small sharded state; returns the states."""
    mesh = make_mesh(2, 2, 2)
    states = {s: _state(mesh, offset=s) for s in (1, 2)}
    with Checkpointer(d, save_every=1, keep=5, async_save=False) as ckpt:
        for s, st in states.items():
            ckpt.save(s, st, extra={"data": {"pos": s}})
    return mesh, states


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_broken_newest_falls_back_to_previous(tmp_path, caplog, corrupt):
    mesh, states = _two_checkpoints(tmp_path)
    corrupt(tmp_path)
    caplog.set_level(logging.WARNING)
    ckpt = Checkpointer(tmp_path, save_every=1, keep=5, async_save=False)
    # An unfinished save of step 3 leaves step 2 as the newest complete one; otherwise step 2 is broken.
    broken, good = (3, 2) if corrupt is _unfinished_save else (2, 1)
    step, state, extra = ckpt.restore(_abstract(states[good], mesh, {}))
    assert step == good and extra == {"data": {"pos": good}}
    _assert_equal(state, states[good])
    assert any(f"step {broken} " in w for w in _warnings(caplog)), _warnings(caplog)
    if corrupt is _data_garbled:  # only the fingerprint written at save time can tell
        assert any("fingerprint" in w and "params/w" in w for w in _warnings(caplog)), _warnings(caplog)
    assert ckpt.latest_step() == good

    # Training goes on and reaches the broken step again: it is moved aside, not in the way.
    new_state = _state(mesh, offset=10)
    assert ckpt.save(broken, new_state, extra={"data": {"pos": broken}})
    step, state, _ = ckpt.restore(_abstract(new_state, mesh, {}))
    ckpt.close()
    assert step == broken
    _assert_equal(state, new_state)
    assert (tmp_path / "2.unreadable").is_dir() == (broken == 2)
    assert not list(tmp_path.glob("*orbax-checkpoint-tmp*"))


def test_latest_step_skips_unreadable_metadata(tmp_path, caplog):
    _two_checkpoints(tmp_path)
    _metadata_truncated(tmp_path)
    caplog.set_level(logging.WARNING)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
    assert any("step 2 " in w and "JSONDecodeError" in w for w in _warnings(caplog))


def test_all_broken_raises_listing_each_step(tmp_path):
    mesh, states = _two_checkpoints(tmp_path)
    _data_truncated(tmp_path)
    _metadata_truncated(tmp_path)
    for f in _data_files(tmp_path / "1"):
        f.unlink()
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError) as info:
            ckpt.restore(_abstract(states[1], mesh, {}))
    msg = str(info.value)
    assert str(tmp_path) in msg and "step 2:" in msg and "step 1:" in msg
    assert (tmp_path / "2").is_dir() and (tmp_path / "1").is_dir()  # nothing moved when nothing restored


def test_wrong_abstract_state_names_the_difference(tmp_path):
    mesh, states = _two_checkpoints(tmp_path)
    abstract = _abstract(states[2], mesh, {})
    w = abstract["params"]["w"]
    abstract["params"]["w"] = jax.ShapeDtypeStruct((4, 16), w.dtype, sharding=w.sharding)
    del abstract["host"]
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ckpt_lib.CheckpointMismatchError, match="does not fit the state") as info:
            ckpt.restore(abstract)
        assert "params/w" in str(info.value) and "host" in str(info.value)
        assert "another model or optimizer config" in info.value.hint
        ckpt.save(3, states[2], force=True)  # a save afterwards moves nothing aside: it was not damage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "3"]


# -- fingerprints -----------------------------------------------------------------------------------


def test_fingerprint_is_sharding_and_backend_independent():
    mesh = make_mesh(1, 2, 4)
    rng = np.random.RandomState(0)
    for x in [rng.randn(8, 4).astype(np.float32), rng.randn(4, 8).astype(jnp.bfloat16),
              rng.randint(-100, 100, (8, 8)).astype(np.int8), rng.rand(8) > 0.5,
              np.uint16(7), np.arange(12, dtype=np.int32).reshape(4, 3)]:
        want = ckpt_lib._hash_np(np.asarray(x))
        assert ckpt_lib._device_hashes([jnp.asarray(x)]) == [want], x.dtype
        if np.ndim(x) == 2 and x.shape[0] % 2 == 0:
            sharded = jax.device_put(x, NamedSharding(mesh, P("fsdp", None)))
            assert ckpt_lib._device_hashes([sharded]) == [want], x.dtype
        flipped = np.array(x, copy=True).reshape(-1)
        if flipped.dtype == np.bool_:
            flipped[-1] = ~flipped[-1]
        else:
            flipped.view(np.uint8)[-1] ^= 0x10  # one bit of the last element
        assert ckpt_lib._hash_np(flipped.reshape(np.shape(x))) != want, x.dtype


# -- preemption -------------------------------------------------------------------------------------


def _wait_for(cond, timeout=5.0):
    end = time.time() + timeout
    while not cond() and time.time() < end:
        time.sleep(0.01)
    return cond()


def test_guard_sigterm_sets_requested_and_close_restores_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    guard = PreemptionGuard()
    assert not guard.requested and not guard.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert _wait_for(lambda: guard.requested)
    assert guard.should_stop(1)
    guard.close()
    assert {s: signal.getsignal(s) for s in before} == before


def test_guard_second_sigint_interrupts():
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(lambda: guard.requested)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for(lambda: False, timeout=2.0)


CHILD = """
import select
import sys
import jax.numpy as jnp
from polmjax.checkpoint import Checkpointer, PreemptionGuard

ckpt = Checkpointer(sys.argv[1], save_every=4, keep=2, async_save=True)
state = {"w": jnp.zeros((4,), jnp.float32)}
with PreemptionGuard() as guard:
    for step in range(1, 1000):
        state = {"w": state["w"] + 1}
        ckpt.save(step, state, extra={"data": {"pos": step}})
        print(f"step {step}", flush=True)
        # The parent paces the loop with a newline per step, and sends SIGTERM instead of one.
        while not guard.requested and not select.select([sys.stdin], [], [], 0.05)[0]:
            pass
        if guard.requested:
            saved = ckpt.save(step, state, extra={"data": {"pos": step}}, force=True)
            ckpt.close()
            print(f"stopped {step} saved={saved}", flush=True)
            sys.exit(0)
        sys.stdin.readline()
sys.exit(3)
"""


def test_sigterm_mid_run_saves_and_exits_cleanly(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(CHILD))
    directory = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(script), str(directory)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for expected in range(1, 7):
            line = proc.stdout.readline()
            assert line.strip() == f"step {expected}", (line, proc.stderr.read() if not line else "")
            if expected == 6:
                proc.send_signal(signal.SIGTERM)
            else:
                proc.stdin.write("\n")
                proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0, err[-3000:]
    assert out.strip() == "stopped 6 saved=True"

    abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=SingleDeviceSharding(jax.devices()[0]))}
    with Checkpointer(directory, save_every=4, keep=2) as ckpt:
        step, state, extra = ckpt.restore(abstract)
    assert step == 6 and extra == {"data": {"pos": 6}}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full(4, 6.0, np.float32))
    assert sorted(p.name for p in directory.iterdir()) == ["4", "6"]
    assert json.loads((directory / "6" / "extra" / "metadata").read_text()) == {"data": {"pos": 6}}


WORKER = """
import os, sys, time
process_id, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
import jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from polmjax.checkpoint import Checkpointer, PreemptionGuard
from polmjax.mesh import make_mesh

sharding = NamedSharding(make_mesh(data=2, fsdp=2), P(("data", "fsdp")))
w = jax.make_array_from_callback((8,), sharding, lambda i: np.arange(8, dtype=np.float32)[i])
ckpt = Checkpointer(directory, save_every=100, keep=2, async_save=True)
bump = jax.jit(lambda w: w + 1)
with PreemptionGuard() as guard:
    for step in range(1, 2000):
        w = bump(w)
        ckpt.save(step, {"w": w}, extra={"pos": step})
        if step == 3:
            print("ready", flush=True)
        time.sleep(0.02)
        if guard.should_stop(step):
            saved = ckpt.save(step, {"w": w}, extra={"pos": step}, force=True)
            ckpt.close()
            break
abstract = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)}
step, state, extra = Checkpointer(directory).restore(abstract)
values = multihost_utils.process_allgather(state["w"], tiled=True).tolist()
print(f"stopped {extra['pos']} saved={saved} restored={step} values={values}", flush=True)
jax.distributed.shutdown()
"""


def test_multihost_sigterm_on_one_host_stops_all_at_one_step(tmp_path):
    """Two processes (2 CPU devices each) under jax.distributed: SIGTERM reaches only process 1, and
    both stop, save and restore at the same step through JAX's preemption sync point."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(tmp_path / "ckpt")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    try:
        for line in procs[1].stdout:  # Gloo prints to stdout too
            if line.strip() == "ready":
                break
        procs[1].send_signal(signal.SIGTERM)
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill() if p.poll() is None else None
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    lines = [[line for line in out.splitlines() if line.startswith("stopped")][-1] for out, _ in results]
    assert lines[0] == lines[1], lines  # same step, same values, on both hosts
    stopped = int(lines[0].split()[1])
    assert f"saved=True restored={stopped} " in lines[0]
    assert f"values={[float(v + stopped) for v in range(8)]}" in lines[0]
