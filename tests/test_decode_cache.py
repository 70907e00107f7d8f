"""A decode step writes only the new token's keys/values: no copy of the KV cache is left in the compiled program.

Read from the compiled HLO, not timed: every instruction whose result has the shape of a cache buffer must be
an in-place dynamic-update-slice of that buffer (or a parameter, tuple element or bitcast of it), never a
copy or any other op that writes the whole buffer, in one jitted decode step with the cache donated and in
the body of `generate`'s decode loop; the unrolled step reads the cache once (bytes accessed grow with the
cache length by about one cache); the outputs reuse the donated buffers. The TPU test checks the bytes
against the physical minimum for a Qwen3-0.6B-shaped step compiled ahead of time for a v5e chip.

On the mesh every device keeps 2 rows and 2 kv heads: with a single one of either, XLA:CPU duplicates the
value update into the attention's read (a copy of that layer's buffer a step; seen on CPU only).
"""

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from polmjax import mesh as mesh_lib
from polmjax import models
from polmjax.generate import generate
from polmjax.models.decoder import KVCache, forward_hidden, logits_from_hidden

B, P, NEW = 8, 8, 5
CFG = models.ModelConfig(family="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=3,
                         num_heads=8, num_kv_heads=4, head_dim=64, layer_types=("sliding", "full", "sliding"),
                         sliding_window=4)
SCHEDULES = {"unrolled": {}, "scan": {"scan_layers": True}}  # scan: one group of (sliding, full), then a tail layer


def _step(cfg, mesh):
    def step(params, tok_B1, cache):
        hidden, cache = forward_hidden(cfg, params, tok_B1, None, None, cache, mesh=mesh)
        return logits_from_hidden(cfg, params, hidden, mesh), cache
    return jax.jit(step, donate_argnums=2)


def _model(cfg, mesh=None):
    """A model of cfg's shapes laid out as `models.create(cfg, mesh=mesh)` lays it out, all zeros: these
    tests read compiled programs, which depend on shapes and shardings only (no initialiser to compile)."""
    shapes = jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    params = jax.device_put(zeros, None if mesh is None else models.param_shardings(cfg, mesh))
    return models.Decoder(cfg, params, mesh=mesh)


def _compile_step(cfg, max_len, mesh=None):
    model = _model(cfg, mesh)
    cache = model.init_cache(B, max_len) if mesh is not None else KVCache.create(cfg, B, max_len)
    tok = jnp.zeros((B, 1), jnp.int32)
    return _step(cfg, mesh).lower(model.params(), tok, cache).compile(), cache


def _buffer_shapes(cfg, max_len, mesh=None):
    """Dims of the cache buffers as the compiled program sees them (per device on a mesh)."""
    per_layer = [B, cfg.num_kv_heads, max_len, cfg.head_dim]
    if mesh is not None:
        per_layer[0] //= mesh.shape["data"] * mesh.shape["fsdp"]
        per_layer[1] //= mesh.shape["tensor"]
    return {tuple(per_layer) if not cfg.scan_layers else (cfg.num_layers, *per_layer)}


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sharded", [False, True], ids=["one_device", "mesh_2x2x2"])
def test_decode_step_writes_in_place(schedule, sharded):
    cfg = CFG.replace(**SCHEDULES[schedule])
    mesh = mesh_lib.make_mesh(2, 2, 2) if sharded else None
    compiled, cache = _compile_step(cfg, 16, mesh)
    hlo = _Hlo(compiled.as_text())
    in_place, others = hlo.cache_writes(hlo.reachable("ENTRY"), _buffer_shapes(cfg, 16, mesh))
    assert others == [], f"instructions writing a whole cache buffer: {others}"
    assert in_place == 2 * cfg.num_layers
    if not sharded:
        cache_bytes = sum(c.nbytes for c in jax.tree.leaves((cache.k, cache.v)))
        assert compiled.memory_analysis().alias_size_in_bytes >= cache_bytes  # outputs reuse the donated buffers


def test_unrolled_decode_step_reads_the_cache_once():
    """Bytes accessed (XLA's cost analysis) grow with the cache length by one read of the added cache
    positions; a copy of the cache would add two more (read and write). Only the difference is checked: on
    CPU the weights are copied out of the stacked arrays before each matmul, which the generate loop avoids."""
    costs, sizes = [], []
    for max_len in (256, 512):
        compiled, cache = _compile_step(CFG, max_len)
        costs.append(compiled.cost_analysis()["bytes accessed"])
        sizes.append(sum(c.nbytes for c in jax.tree.leaves((cache.k, cache.v))))
    ratio = (costs[1] - costs[0]) / (sizes[1] - sizes[0])
    assert ratio < 1.3, f"each added cache byte costs {ratio:.2f} bytes accessed a step"


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("sharded", [False, True], ids=["one_device", "mesh_2x2x2"])
def test_generate_decode_loop_writes_in_place(schedule, sharded):
    cfg = CFG.replace(**SCHEDULES[schedule])
    mesh = mesh_lib.make_mesh(2, 2, 2) if sharded else None
    model = _model(cfg, mesh)
    ids = np.ones((B, P), np.int32)
    compiled = generate.lower(cfg, model.params(), ids, ids, max_new_tokens=NEW, eos_id=-1, mesh=mesh).compile()
    hlo = _Hlo(compiled.as_text())
    rows = B // (mesh.shape["data"] * mesh.shape["fsdp"]) if sharded else B
    loop = hlo.while_body(carries=(rows, NEW))  # the generated tokens (this device's rows): the decode loop's state
    in_place, others = hlo.cache_writes(hlo.reachable(loop), _buffer_shapes(cfg, P + NEW, mesh))
    assert others == [], f"instructions writing a whole cache buffer in the decode loop: {others}"
    assert in_place == 2 * cfg.num_layers
    if not cfg.scan_layers and not sharded:  # the loop reads per-layer weights sliced before it (CPU)
        stacked = {tuple(s.shape) for name, s in models.param_specs(cfg).items() if name.startswith("layers/")}
        assert not [i for i in hlo.instructions(hlo.reachable(loop)) if i.dims in stacked and i.op != "parameter"]


@pytest.mark.tpu_aot
def test_tpu_decode_at_the_memory_roofline():
    """Qwen3-0.6B shapes (8 of its 28 layers, to compile faster), batch 64, cache 2048, bf16, one v5e chip:
    a decode step accesses <= 1.2x (weights + one read of the cache + the new entries), whatever the weights'
    layout. And `generate`'s decode loop updates the cache in place on TPU for both layer schedules (XLA:TPU
    keeps the scanned stack in a layout of its own inside the loop, relaid out once before it)."""
    pytest.importorskip("libtpu", reason="libtpu (pip install 'jax[tpu]') provides the TPU compiler")
    roofline = _roofline_script()
    try:
        devices = roofline.tpu_devices("v5e:1x1")
    except RuntimeError as err:
        pytest.skip(str(err))
    for layout in ("auto", "default"):
        r = roofline.decode_step_bytes(roofline.qwen3_0_6b(layers=8), 64, 2048, "v5e:1x1", layout)
        assert r["ratio"] <= 1.2, f"weights' layout {layout}: {r['bytes'] / 1e9:.3f} GB accessed a step, " \
                                  f"minimum {r['minimum'] / 1e9:.3f} GB"
    mesh = jax.sharding.Mesh(np.array(devices).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    for scan in (False, True):
        cfg = roofline.qwen3_0_6b(layers=4, scan_layers=scan)
        shardings = models.decoder.flatten(models.decoder.param_shardings(cfg, mesh))
        params = models.decoder.unflatten({
            name: jax.ShapeDtypeStruct(spec.shape, jnp.bfloat16, sharding=shardings[name])
            for name, spec in models.param_specs(cfg).items()})
        ids = jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=mesh_lib.named_sharding(mesh, ("act_batch", "act_len"),
                                                                                        (B, P)))
        compiled = generate.lower(cfg, params, ids, ids, max_new_tokens=NEW, eos_id=-1, mesh=mesh).compile()
        hlo = _Hlo(compiled.as_text())
        in_place, others = hlo.cache_writes(hlo.reachable(hlo.while_body(carries=(B, NEW))),
                                            _buffer_shapes(cfg, P + NEW))
        assert others == [] and in_place == 2 * (1 if scan else cfg.num_layers), (scan, others)


def _roofline_script():
    path = os.path.join(os.path.dirname(__file__), "..", "experiments", "benchmarks", "decode_roofline.py")
    spec = importlib.util.spec_from_file_location("decode_roofline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Instr:
    _RE = re.compile(r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?:(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]\S*|\(.*?\)\S*) "
                     r"(?P<op>[\w\-]+)\((?P<args>.*)$")

    def __init__(self, line):
        m = self._RE.match(line)
        self.ok = m is not None
        if self.ok:
            self.name, self.op, self.line = m["name"], m["op"], line
            self.dims = None if m["dims"] is None else tuple(int(d) for d in m["dims"].split(",") if d)
            self.calls = re.findall(r"(?:calls|body|condition|to_apply|branch_computations)=\{?%([\w.\-]+)", line)


class _Hlo:
    """The computations of a compiled module's HLO text, enough to follow loops and fusions."""

    def __init__(self, text):
        self.comps, name = {}, None
        for line in text.splitlines():
            head = re.match(r"^(ENTRY )?%([\w.\-]+) .*\{$", line)
            if head:
                name = "ENTRY" if head[1] else head[2]
                self.comps[name] = []
            elif line.startswith("}"):
                name = None
            elif name is not None:
                instr = _Instr(line)
                if instr.ok:
                    self.comps[name].append(instr)

    def instructions(self, comps):
        return [i for c in comps for i in self.comps[c]]

    def reachable(self, root):
        """`root` and the loop bodies, conditions and calls under it (fused computations are looked into
        through their fusion instruction instead)."""
        seen, todo = [], [root]
        while todo:
            c = todo.pop()
            if c not in seen:
                seen.append(c)
                todo += [t for i in self.comps[c] if i.op != "fusion" for t in i.calls]
        return seen

    def while_body(self, carries):
        """The body of the one top-level loop whose state holds an array of dims `carries`."""
        dims = re.compile(r"\[" + ",".join(map(str, carries)) + r"\]")
        loops = [i for i in self.comps["ENTRY"] if i.op == "while" and dims.search(i.line.split(" while(")[0])]
        assert len(loops) == 1, f"expected one loop carrying a {carries} array, found {len(loops)}"
        return re.search(r"body=%([\w.\-]+)", loops[0].line)[1]

    def cache_writes(self, comps, shapes):
        """(number of in-place dynamic-update-slices of a cache buffer, other instructions writing one)."""
        in_place, others = 0, []
        for i in self.instructions(comps):
            if i.dims not in shapes or i.op in ("parameter", "get-tuple-element", "bitcast"):
                continue
            if i.op == "dynamic-update-slice" or (i.op == "fusion" and self._updates_in_place(i.calls[0])):
                in_place += 1
            else:
                others.append(f"{i.name} = {i.op}")
        return in_place, others

    def _updates_in_place(self, fused):
        """The fused computation's root is a dynamic-update-slice of one of its parameters (through bitcasts)."""
        by_name = {i.name: i for i in self.comps[fused]}
        root = next(i for i in self.comps[fused] if i.line.lstrip().startswith("ROOT"))
        while root.op == "bitcast":
            root = by_name[re.match(r"%([\w.\-]+)", root.line.split("bitcast(")[1])[1]]
        if root.op != "dynamic-update-slice":
            return False
        target = by_name[re.match(r"%([\w.\-]+)", root.line.split("dynamic-update-slice(")[1])[1]]
        while target.op == "bitcast":
            target = by_name[re.match(r"%([\w.\-]+)", target.line.split("bitcast(")[1])[1]]
        return target.op == "parameter"
