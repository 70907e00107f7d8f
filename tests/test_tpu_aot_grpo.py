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
    # 8 prompts x 8 samples of 16 tokens, rows of 64; off-policy (2 mini-batches) with a KL term: every
    # rollout program runs
    shape = ["train.global_batch=64", "num_generations=8", "train.seq_len=64", "max_completion_len=16",
             "train.grad_accum=1", "cache_dtype=", "lora=null"]
    report = compile_step(os.path.join(ROOT, "experiments", "grpo", "tiny.py"), "v5e:2x2",
                          [f"model.path={tmp_path}", "mesh.data=2", "mesh.fsdp=2", "beta=0.04", "mini_batches=2",
                           *shape])
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


@pytest.mark.tpu_aot
def test_an_experiment_that_does_not_fit_is_named_not_raised(tmp_path, capsys):
    pytest.importorskip("libtpu", reason="libtpu (pip install 'jax[tpu]') provides the TPU compiler")
    from aot_compile import main
    from hf_models import hf_config

    hf_config("qwen3", max_position_embeddings=1 << 17).save_pretrained(tmp_path)
    argv = [os.path.join(ROOT, "experiments", "grpo", "tiny.py"), "--target", "v5e:2x2", "--set",
            f"model.path={tmp_path}", "--set", "train.seq_len=131072", "--set", "train.global_batch=512"]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert out.startswith("does not fit on v5e:2x2: the train step: RESOURCE_EXHAUSTED"), out[:500]
