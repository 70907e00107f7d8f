"""`tpu/aot_compile.py` on a GRPO experiment compiles the update and every program of the rollout (the
sampler's prefill and decode, the old policy's and the reference's log-prob forwards) for a TPU topology
from this CPU host, and its peak counts the train state and frozen inputs as resident through them all
(needs libtpu)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tpu"))

from aot_compile import compile_step  # noqa: E402


@pytest.mark.tpu_aot
def test_tiny_grpo_step_and_sampler_compile_and_fit(tmp_path):
    pytest.importorskip("libtpu", reason="libtpu (pip install 'jax[tpu]') provides the TPU compiler")
    from hf_models import hf_config

    config = hf_config("qwen3")  # 3 layers, 2 kv heads of 24; config.json only: aot_compile reads no weights
    config.save_pretrained(tmp_path)
    # off-policy (2 mini-batches) with a KL term: every rollout program runs
    report = compile_step(os.path.join(ROOT, "experiments", "grpo", "tiny.py"), "v5e:2x2",
                          [f"model.path={tmp_path}", "mesh.data=2", "mesh.fsdp=2", "beta=0.04", "mini_batches=2"])
    assert report["fits"] and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert report["sampler"] == "8 prompts x 64 tokens -> 8 x 16 new tokens (64 rows), cache compute dtype"
    b = report["bytes"]
    extras = {k: v for k, v in b.items() if k.endswith("_extra")}
    assert set(extras) == {"prefill_extra", "decode_extra", "old_logps_extra", "ref_logps_extra"}
    assert b["peak"] == max(b["total"], b["resident"] + max(extras.values()))
    assert report["peak_per_device_GiB"] == round(b["peak"] / 2**30, 3)
    # resident: the state (fp32 params, Adam's mu and nu) and the reference copy; the step's batch is one
    # mini-batch: 11 float32/int32 keys of 64 / 2 rows over 4 devices x 64 tokens
    assert b["arguments"] - b["resident"] == 11 * (64 // 2 // 4) * 64 * 4
    assert b["resident"] > 3 * b["frozen"] > 0
    # the decode holds at least the grown KV cache: 64 rows over data x fsdp, 64 prompt + 16 new slots,
    # k and v of 3 layers x 2 kv heads x 24 (float32), per device
    assert extras["decode_extra"] >= (64 // 4) * (64 + 16) * 2 * 3 * 2 * 24 * 4
