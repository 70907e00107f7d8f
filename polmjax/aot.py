"""Compile for accelerators this host does not have: TPU slices (libtpu) and NVIDIA GPUs (the CUDA plugin).

`devices("v5e:2x2")` or `devices("h100:8")` returns compile-only devices of that target. Arrays placed on
them as `jax.ShapeDtypeStruct(..., sharding=...)` go through `jax.jit(f).lower(...).compile()` with the
real compilers: XLA:TPU and Mosaic for TPUs; XLA:GPU, Triton (Pallas GPU kernels) and LLVM's NVPTX
backend for GPUs. They reject what the hardware would reject (Mosaic block shapes, VMEM overflow,
shared-memory overflow of a Triton kernel, lowering errors that interpret mode never sees), and
`compiled.memory_analysis()` gives each device's memory. Nothing runs, so nothing is timed.

    pip install "jax[tpu]"                                          # TPU targets
    pip install "jax[cuda12-local]" nvidia-cuda-nvcc-cu12           # GPU targets (+ ptxas for registers)

GPU targets need JAX_PLATFORMS=cpu on a host without CUDA libraries (the CUDA plugin then registers for
compilation only instead of failing its runtime check).

`compile_with_kernels(lowered)` compiles once and reports each Pallas GPU kernel's grid, threads, shared
memory (from XLA's thunk sequence), registers and spills (ptxas on the kernel's PTX), and the resulting
thread blocks per SM: the resources that decide whether a tile size is viable, read without a GPU.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import shutil
import subprocess
import tempfile

# HBM per TPU chip, bytes.
TPU_HBM = {"v4": 32 * 2**30, "v5e": 16 * 2**30, "v5p": 95 * 2**30, "v6e": 32 * 2**30}


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """What XLA:GPU needs to compile for an NVIDIA GPU without one (its GpuTargetConfigProto)."""

    name: str  # device_kind of the compile-only devices
    compute_capability: tuple[int, int]
    sm_count: int
    memory_bytes: int
    memory_bandwidth: float  # bytes/s
    l2_bytes: int
    clock_ghz: float
    fpus_per_sm: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    registers_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32

    def target_config(self) -> str:
        """The GpuTargetConfigProto in text format (`get_topology_desc(platform="cuda", target_config=)`)."""
        major, minor = self.compute_capability
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_sm}
  threads_per_core_limit: {self.max_threads_per_sm}
  core_count: {self.sm_count}
  fpus_per_core: {self.fpus_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.memory_bandwidth)}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: {self.registers_per_sm}
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{self.name}"
"""


# SXM parts, from NVIDIA's data sheets (memory as the driver reports it: slightly under the marketed size).
GPUS = {
    "a100": GpuSpec("NVIDIA A100-SXM4-80GB", (8, 0), sm_count=108, memory_bytes=85_100_000_000,
                    memory_bandwidth=2.039e12, l2_bytes=40 * 2**20, clock_ghz=1.41, fpus_per_sm=64,
                    shared_memory_per_sm=167_936, shared_memory_per_block_optin=166_912),
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), sm_count=132, memory_bytes=84_942_979_072,
                    memory_bandwidth=3.35e12, l2_bytes=50 * 2**20, clock_ghz=1.98, fpus_per_sm=128,
                    shared_memory_per_sm=233_472, shared_memory_per_block_optin=232_448),
    "h200": GpuSpec("NVIDIA H200", (9, 0), sm_count=132, memory_bytes=150_000_000_000,
                    memory_bandwidth=4.8e12, l2_bytes=50 * 2**20, clock_ghz=1.98, fpus_per_sm=128,
                    shared_memory_per_sm=233_472, shared_memory_per_block_optin=232_448),
}


def parse_target(target: str) -> tuple[str, str, int]:
    """"v5e:2x2" -> ("tpu", "v5e:2x2", 4); "h100:8" / "h100" -> ("gpu", "h100", 8 / 1)."""
    name, _, shape = target.partition(":")
    name = name.lower()
    if name in GPUS:
        if shape and not shape.isdigit():
            raise ValueError(f"GPU target {target!r}: write '<gpu>:<count>', e.g. 'h100:8'")
        return "gpu", name, int(shape or 1)
    if name in TPU_HBM:
        if not re.fullmatch(r"\d+(x\d+)*", shape):
            raise ValueError(f"TPU target {target!r}: write '<generation>:<topology>', e.g. 'v5e:2x2'")
        return "tpu", target, math.prod(int(d) for d in shape.split("x"))
    raise ValueError(f"unknown target {target!r}: GPUs {sorted(GPUS)} (e.g. 'h100:8'), "
                     f"TPUs {sorted(TPU_HBM)} (e.g. 'v5p:2x2x1')")


def devices(target: str) -> list:
    """Compile-only devices of `target` ("v5e:2x2", "v5p:2x2x1", "h100", "h200:8", "a100:2")."""
    from jax.experimental import topologies

    kind, name, count = parse_target(target)
    if kind == "tpu":
        # libtpu takes a host-wide lock and probes for TPU hosts unless told otherwise; compiling needs neither.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        try:
            return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
        except Exception as err:
            raise RuntimeError(f"cannot build TPU topology {name!r} (install libtpu: pip install "
                               f"'jax[tpu]'): {err}") from err
    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=GPUS[name].target_config(),
                                            topology=f"1x1x{count}")
    except Exception as err:
        # Without CUDA libraries the plugin only registers when JAX is told not to use it as a backend.
        hint = "" if os.environ.get("JAX_PLATFORMS") == "cpu" else ", and run with JAX_PLATFORMS=cpu"
        raise RuntimeError(f"cannot build GPU target {target!r} (install the CUDA plugin: pip install "
                           f"'jax[cuda12-local]' nvidia-cuda-nvcc-cu12{hint}): {err}") from err
    return list(topo.devices)


def memory_bytes(target: str) -> int | None:
    """HBM of one device of `target`, bytes (None for a TPU generation not in the table)."""
    kind, name, _ = parse_target(target)
    return GPUS[name].memory_bytes if kind == "gpu" else TPU_HBM.get(name.split(":")[0])


# ----------------------------------------------------------------------------- Triton kernel resources


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """One GPU kernel of a compiled program. registers/spill_bytes are None without ptxas."""

    name: str
    grid: tuple[int, ...]
    threads: int
    shared_memory: int
    registers: int | None
    spill_bytes: int | None
    blocks_per_sm: int | None  # resident thread blocks per SM (occupancy), from the limits above

    def row(self) -> str:
        grid = "x".join(map(str, self.grid))
        unknown = lambda x: "?" if x is None else x  # noqa: E731
        return (f"{self.name:<34} grid {grid:<14} threads {self.threads:>4}  smem {self.shared_memory / 1024:7.1f} KiB"
                f"  regs {unknown(self.registers):>3}  spills {unknown(self.spill_bytes):>3} B"
                f"  blocks/SM {unknown(self.blocks_per_sm)}")


def compile_with_kernels(lowered, spec: GpuSpec | str = "h100", prefix: str = "polmjax_"):
    """(compiled, kernels): compile `lowered` (a `jax.jit(f).lower(...)` for GPU devices) and report its
    kernels named `prefix`* as a list of KernelResources.

    Grid, threads and shared memory come from XLA's thunk sequence; registers and spill bytes from
    `ptxas -v` on the kernel's PTX (ptxas from nvidia-cuda-nvcc-cu12 or the PATH; None without it).
    """
    spec = GPUS[spec] if isinstance(spec, str) else spec
    with tempfile.TemporaryDirectory() as dump:
        compiled = lowered.compile(compiler_options={"xla_dump_to": dump})
        launches = {}
        for path in glob.glob(os.path.join(dump, "*thunk_sequence.txt")):
            for m in re.finditer(r"(\S+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+shared_memory: (\d+) bytes",
                                 open(path).read()):
                if m.group(1).startswith(prefix):
                    grid = tuple(int(x) for x in m.group(2).split(","))
                    launches[m.group(1)] = (grid, math.prod(int(x) for x in m.group(3).split(",")), int(m.group(4)))
        ptx = {}
        for path in glob.glob(os.path.join(dump, "*.ptx")):
            for name in re.findall(r"\.entry (\w+)\(", open(path).read()):
                ptx[name] = path
        ptxas = _ptxas()
        report = []
        for name, (grid, threads, smem) in sorted(launches.items()):
            regs = spills = None
            if ptxas and name in ptx:
                regs, spills = _ptxas_resources(ptxas, ptx[name], name)
            report.append(KernelResources(name, grid, threads, smem, regs, spills,
                                          _blocks_per_sm(spec, threads, smem, regs)))
    return compiled, report


def _ptxas() -> str | None:
    try:
        import nvidia.cuda_nvcc

        for root in nvidia.cuda_nvcc.__path__:
            path = os.path.join(root, "bin", "ptxas")
            if os.path.exists(path):
                return path
    except ImportError:
        pass
    return shutil.which("ptxas")


def _ptxas_resources(ptxas: str, ptx_path: str, kernel: str) -> tuple[int, int]:
    """(registers per thread, spill store + load bytes) of `kernel` from `ptxas -v`."""
    target = re.search(r"^\.target (\w+)", open(ptx_path).read(), re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([ptxas, "-v", f"-arch={target}", ptx_path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    # ptxas prints a block per entry: "Compiling entry function 'name'", spills, then "Used N registers".
    block = out[out.index(f"'{kernel}'"):]
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", block)
    regs = re.search(r"Used (\d+) registers", block)
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))


def _blocks_per_sm(spec: GpuSpec, threads: int, smem: int, regs: int | None) -> int | None:
    """Resident thread blocks per SM under the register, shared-memory, thread and block limits."""
    if regs is None:
        return None
    warps = -(-threads // 32)
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocated in units of 256 registers per warp
    by_regs = spec.registers_per_sm // (regs_per_warp * warps)
    by_smem = spec.shared_memory_per_sm // (smem + 1024) if smem else spec.max_blocks_per_sm  # 1 KiB reserved
    return int(min(by_regs, by_smem, spec.max_threads_per_sm // threads, spec.max_blocks_per_sm))
