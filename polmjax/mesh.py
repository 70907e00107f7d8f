"""Device mesh, logical axis names and the one table that maps them onto mesh axes.

Parameters and activations name their dimensions with logical axes (`embed`, `mlp`, `heads`, ...).
`DEFAULT_RULES` maps each logical axis to zero or more of the mesh axes `data`, `fsdp`, `tensor`.
Changing the parallelism of a run is a change of mesh shape (or of this table), never of model code.

A mesh axis that does not divide a dimension is dropped for that dimension (the dimension is then
replicated over it), so a tiny model with 2 kv heads still runs on `tensor=4`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes. Parameters: stored sharded over fsdp (ZeRO-3 style) and tensor (Megatron
# style). Activations: batch over data+fsdp, features over tensor.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "layers": (),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "norm": (),
    "lora_rank": (),
    # activations
    "act_batch": ("data", "fsdp"),
    "act_len": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    "cache_len": (),
}

Rules = Mapping[str, Sequence[str]]


def make_mesh(data: int | None = None, fsdp: int | None = None, tensor: int | None = None,
              devices: Sequence | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor); one size may be -1 to take the remaining devices.

    Unset axes are 1, except fsdp, which takes the remaining devices when no axis is -1.

    Axis types are Auto: shardings are propagated by the compiler from the annotations we place.
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp is None:
        fsdp = 1 if -1 in (data, tensor) else -1
    data, tensor = (1 if data is None else data), (1 if tensor is None else tensor)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
        raise ValueError(
            f"make_mesh: data={data} fsdp={fsdp} tensor={tensor} does not fit {len(devices)} devices"
        )
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"make_mesh: data*fsdp*tensor = {math.prod(sizes)} but there are {len(devices)} devices; "
            "use -1 for one axis to take the rest"
        )
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices
    )


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry `axes` (logical names, or None).

    With `shape` and `mesh`, mesh axes of size 1 and those that do not divide the dimension are dropped.
    A mesh axis is used at most once per array (the first dimension that asks for it gets it).
    """
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no entry in the sharding rules {sorted(rules)}")
        dim = None if shape is None else shape[i]
        chosen = []
        for mesh_axis in rules[name]:
            if mesh_axis in used:
                continue
            if mesh is not None:
                if mesh_axis not in mesh.shape:
                    continue
                size = mesh.shape[mesh_axis]
                if size == 1:
                    continue
                if dim is not None and dim % (size * math.prod(mesh.shape[a] for a in chosen)):
                    continue
            chosen.append(mesh_axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def named_sharding(
    mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int], rules: Rules | None = None
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None, rules: Rules | None = None):
    """Sharding constraint on an activation by logical axes; identity when no mesh is given."""
    if mesh is None:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"constrain: {len(axes)} logical axes {tuple(axes)} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, axes, x.shape, rules))


def initialize_distributed() -> None:
    """`jax.distributed.initialize()` when launched on several hosts (TPU pod slice or multi-node GPU).

    On TPU pods and SLURM / Open MPI clusters JAX discovers the coordinator itself; elsewhere set
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. A single-host run does nothing.
    """
    if jax.distributed.is_initialized():
        return
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    elif _launched_on_several_hosts():
        jax.distributed.initialize()
    else:
        return
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def _launched_on_several_hosts() -> bool:
    return (
        "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )


def host_local_array(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly sharded, possibly multi-host) array on this host, as numpy."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
