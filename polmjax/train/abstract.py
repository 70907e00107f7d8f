"""Abstract inputs of any algorithm's train step, for compiling it ahead of time without any arrays.

    step, (state, frozen, batch) = abstract_step(exp, algorithm, model_cfg, mesh)
    compiled = step.lower(state, frozen, batch).compile()        # memory_analysis(), cost_analysis()

Every input is a `jax.ShapeDtypeStruct` carrying the sharding the real run gives it (`polmjax.train.run`):
parameters by their logical axes, the optimizer state like the parameters it mirrors, the step's
`frozen` argument built by `algorithm.frozen` (the LoRA base, DPO's reference model) with each leaf
sharded like the parameter it copies, and the batch keys over ("act_batch", "act_len") (for RL, one
mini-batch of the rollout). Nothing is allocated, so a 1.7B model compiles for a TPU slice from a laptop
(`tpu/aot_compile.py`) and the compile checks (`tests/test_step_compile.py`) see exactly the program a
run would jit.
"""

from __future__ import annotations

import jax
import numpy as np

from polmjax import mesh as mesh_lib
from polmjax import models
from polmjax.data.packing import DTYPES
from polmjax.models import lora as lora_lib
from polmjax.train.optim import make_optimizer
from polmjax.train.state import init_state, state_shardings_for

# dtype of every per-token batch key a pipeline produces (polmjax.data: packing, preference, unpaired)
BATCH_DTYPES = {**DTYPES, "is_chosen": np.bool_, "pair_ids": np.int32, "example_ids": np.int32,
                "margin": np.float32,
                # GRPO (polmjax.train.grpo.BATCH_KEYS)
                **dict.fromkeys(("weights", "token_weights", "advantages", "sampler_logps", "old_logps", "ref_logps"),
                                np.float32)}


def abstract_step(exp, algorithm, model_cfg, mesh):
    """(`algorithm.jit_step(...)`, (state, frozen, batch)) for `exp` on `mesh`, all abstract."""
    trainable, base = abstract_params(model_cfg, mesh, lora=exp.lora is not None)
    optimizer, schedule = make_optimizer(exp.optim, exp.optim.horizon(exp.train.steps))
    state, state_sh = abstract_state(trainable, optimizer, mesh)
    frozen = abstract_frozen(algorithm, exp, trainable, base)
    keys = algorithm.batch_keys(exp) if callable(algorithm.batch_keys) else algorithm.batch_keys
    # an RL step updates on mini-batches of its rollout (GRPO's `mini_batches`): one is the step's batch
    rows = exp.train.global_batch // getattr(exp, "mini_batches", 1)
    batch = abstract_batch(keys, rows, exp.train.seq_len, mesh)
    step = algorithm.jit_step(exp, model_cfg, optimizer, schedule, mesh, state_sh, _shardings(frozen),
                              _shardings(batch))
    return step, (state, frozen, batch)


def abstract_params(model_cfg, mesh, *, lora: bool = False) -> tuple[dict, dict]:
    """(trainable, frozen base) parameters with their shardings; the base is {} without LoRA."""
    shapes = jax.eval_shape(lambda: models.init_params(model_cfg, jax.random.key(0)))
    params = jax.tree.map(_placed, shapes, models.param_shardings(model_cfg, mesh))
    return lora_lib.split(params) if lora else (params, {})


def abstract_state(trainable: dict, optimizer, mesh):
    """(state, its shardings): the train state of `trainable` placed as `init_state_sharded` places it."""
    state_sh = state_shardings_for(trainable, optimizer, mesh)
    shapes = jax.eval_shape(lambda p: init_state(p, optimizer, 0), trainable)
    return jax.tree.map(_placed, shapes, state_sh), state_sh


def abstract_frozen(algorithm, exp, trainable: dict, base: dict):
    """The step's `frozen` argument: `algorithm.frozen(exp, trainable, base)` traced abstractly, each
    leaf sharded like the parameter whose path it ends with (a reference copy is sharded like the policy)."""
    if algorithm.frozen is None:
        return base
    shapes = jax.eval_shape(lambda t, b: algorithm.frozen(exp, t, b), trainable, base)
    by_keys = {_keys(path)[1:]: leaf for path, leaf in jax.tree_util.tree_leaves_with_path((trainable, base))}

    def place(path, leaf):
        keys = _keys(path)
        for n in range(len(keys), 0, -1):
            param = by_keys.get(keys[-n:])
            if param is not None and param.shape == leaf.shape:
                return _placed(leaf, param.sharding)
        raise ValueError(f"frozen input {'/'.join(map(str, keys))} {leaf.shape}: no parameter of that path and "
                         f"shape to take its sharding from")

    return jax.tree_util.tree_map_with_path(place, shapes)


def abstract_batch(keys, global_batch: int, seq_len: int, mesh) -> dict:
    """{key: [global_batch, seq_len]} with each key's pipeline dtype, sharded over (act_batch, act_len)."""
    unknown = [k for k in keys if k not in BATCH_DTYPES]
    if unknown:
        raise ValueError(f"batch keys {unknown}: add their dtypes to polmjax.train.abstract.BATCH_DTYPES")
    sharding = mesh_lib.named_sharding(mesh, ("act_batch", "act_len"), (global_batch, seq_len))
    return {k: jax.ShapeDtypeStruct((global_batch, seq_len), BATCH_DTYPES[k], sharding=sharding) for k in keys}


def _placed(shape, sharding):
    return jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding)


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)
