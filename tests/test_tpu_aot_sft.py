"""The SFT train step compiles for real TPU topologies from this CPU host (needs libtpu)."""

import os

import pytest

pytest.importorskip("libtpu", reason="libtpu (pip install 'jax[tpu]') provides the TPU compiler")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.tpu_aot
# CI time: v6e is slow. The step is the same program on either chip; what v6e itself changes, the Mosaic
# lowering of the kernels, test_logprobs_tpu_aot and test_attention_tpu_aot check on v6e:2x2.
@pytest.mark.parametrize("topology", ["v5e:2x2", pytest.param("v6e:2x2", marks=pytest.mark.slow)])
def test_tiny_sft_step_compiles_and_fits(topology):
    import sys

    sys.path.insert(0, os.path.join(ROOT, "tpu"))
    from aot_compile import compile_sft_step

    report = compile_sft_step(os.path.join(ROOT, "experiments", "sft", "tiny.py"), topology,
                              ["mesh.fsdp=2", "mesh.data=2", "lora.rank=4"])
    assert report["fits"] and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert report["pallas_kernel_calls"] >= 2  # the fused log-prob kernels (forward, backward) in shard_map
