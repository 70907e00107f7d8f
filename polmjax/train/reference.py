"""Reference log-probs computed once over the data set and cached in the run directory.

DPO's `reference="precomputed"` (TRL's `precompute_ref_log_probs`): before training, one pass of the
reference model over every example of a split stores each document's per-token target log-probs in
`run_dir/reference_logps/<split>.npz`; training then reads them with the batch (`ref_logps`, [B, T],
packed like every other per-token field) instead of running a reference forward each step: no
reference parameters in device memory and a third less compute per step. A restarted run, or one
that is extended, reads the cache instead of recomputing it; a cache written for another model,
data set or sequence length is recomputed. One process only (each process would need every
record's values: they are not gathered across hosts yet).

    cache = reference_logps(exp, data_cfg, tokenizer, "train", mesh)        # {record: float32 [len]}
    pipe = ReferencePipeline(data_cfg, tokenizer, ref_logps=cache, global_batch=..., seq_len=...)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import numpy as np

from polmjax import config as config_lib
from polmjax import mesh as mesh_lib
from polmjax.data import DataConfig, DataError, PreferencePipeline
from polmjax.models.decoder import forward_hidden, target_logprobs

log = logging.getLogger("polmjax")


class ReferencePipeline(PreferencePipeline):
    """A `PreferencePipeline` whose batches also carry `ref_logps` (float32 [rows, seq_len]): the
    reference model's log-prob of each target, from `reference_logps`' cache (0 on padding)."""

    FIELDS = (*PreferencePipeline.FIELDS, "ref_logps")

    def __init__(self, cfg: DataConfig, tokenizer, *, ref_logps: dict[int, np.ndarray], **kwargs):
        self.ref_logps = ref_logps  # before super().__init__: it tokenises a few examples to probe
        super().__init__(cfg, tokenizer, **kwargs)

    def _prepare(self, item):
        out = super()._prepare(item)
        if out["doc"] is not None:
            record, n = item[2], len(out["doc"]["input_ids"])
            values = self.ref_logps.get(record)
            if values is None or len(values) != n:
                got = "no entry" if values is None else f"{len(values)} tokens"
                raise DataError(f"{self.records.where(record)}: the precomputed reference log-probs have {got}, "
                                f"the example has {n} tokens (a stale reference_logps cache: delete it)")
            out["doc"] = out["doc"] | {"ref_logps": values}
        return out

    def fingerprint(self):
        return super().fingerprint() | {"reference": "precomputed"}


class _RecordPipeline(PreferencePipeline):
    """Every token carries the index of its record, so a batch's log-probs can be put back per record."""

    FIELDS = (*PreferencePipeline.FIELDS, "record_ids")

    def _prepare(self, item):
        out = super()._prepare(item)
        if out["doc"] is not None:
            out["doc"] = out["doc"] | {"record_ids": np.full(len(out["doc"]["input_ids"]), item[2], np.int32)}
        return out


def reference_logps(exp, data_cfg: DataConfig, tokenizer, split: str, mesh) -> dict[int, np.ndarray]:
    """{record index: float32 [document length]} for every example of `split`, from the cache in
    exp.train.run_dir when it was written for the same model, data and lengths; else computed now
    with the reference model (the initial model without LoRA adapters) and cached."""
    if jax.process_count() > 1:
        raise config_lib.ConfigError("reference='precomputed' runs on one process only for now",
                                     hint="use reference='copy' (or 'base' with LoRA) on several hosts")
    tc = exp.train
    path = os.path.join(tc.run_dir, "reference_logps", f"{split}.npz")
    key = json.dumps({"model": config_lib.to_dict(exp.model), "data": config_lib.to_dict(data_cfg),
                      "seq_len": tc.seq_len, "seed": tc.seed, "vocab": len(tokenizer), "split": split},
                     sort_keys=True)
    if os.path.exists(path):
        with np.load(path) as f:
            if str(f["key"]) == key:
                return _unflatten(f["records"], f["offsets"], f["values"])
        log.info("%s was written for another model, data set or length: recomputing it", path)

    from polmjax.train.run import load_model  # the run imports this module's users

    model = load_model(exp.model, None, tokenizer, mesh, tc.seed)
    cfg, params = model.config, model.params()
    pipe = _RecordPipeline(dataclasses.replace(data_cfg, num_epochs=1), tokenizer, global_batch=tc.global_batch,
                           seq_len=tc.seq_len, split=split)
    sharding = mesh_lib.named_sharding(mesh, ("act_batch", "act_len"), (tc.global_batch, tc.seq_len))
    keys = ("input_ids", "targets", "positions", "segment_ids")

    @jax.jit
    def logprobs(params, batch):
        hidden_BTD, _ = forward_hidden(cfg, params, batch["input_ids"], batch["positions"], batch["segment_ids"],
                                       mesh=mesh)
        return target_logprobs(cfg, params, hidden_BTD, batch["targets"], mesh=mesh)

    out: dict[int, np.ndarray] = {}
    for batch in pipe:
        lp_BT = np.asarray(logprobs(params, {k: jax.device_put(batch[k], sharding) for k in keys}))
        for b in range(lp_BT.shape[0]):
            ids, real = batch["record_ids"][b], batch["segment_ids"][b] > 0  # padding has record id 0 too
            for record in np.unique(ids[real]):
                out[int(record)] = lp_BT[b, (ids == record) & real]
    del model, params
    log.info("reference log-probs of %d %s examples computed and cached in %s", len(out), split, path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    records = np.asarray(sorted(out), np.int64)
    lengths = np.asarray([len(out[r]) for r in records], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.concatenate([out[r] for r in records]) if len(records) else np.zeros(0, np.float32)
    tmp = path + ".tmp.npz"
    np.savez(tmp, key=np.asarray(key), records=records, offsets=offsets, values=values.astype(np.float32))
    os.replace(tmp, path)
    return out


def _unflatten(records, offsets, values) -> dict[int, np.ndarray]:
    return {int(r): values[offsets[i]:offsets[i + 1]] for i, r in enumerate(records)}
