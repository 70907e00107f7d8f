"""polmjax.aot without any compiler: target names, GPU target configs, occupancy arithmetic."""

import pytest

from polmjax import aot


@pytest.mark.parametrize("target,expected", [
    ("v5e:2x2", ("tpu", "v5e:2x2", 4)),
    ("v5p:2x2x1", ("tpu", "v5p:2x2x1", 4)),
    ("h100", ("gpu", "h100", 1)),
    ("H200:8", ("gpu", "h200", 8)),
    ("a100:2", ("gpu", "a100", 2)),
])
def test_parse_target(target, expected):
    assert aot.parse_target(target) == expected


@pytest.mark.parametrize("target,message", [
    ("h100:2x2", "write '<gpu>:<count>'"),
    ("v5e", "write '<generation>:<topology>'"),
    ("v5e:2by2", "write '<generation>:<topology>'"),
    ("mi300:8", "unknown target 'mi300:8'"),
])
def test_parse_target_errors_name_the_fix(target, message):
    with pytest.raises(ValueError, match=message):
        aot.parse_target(target)


def test_memory_bytes():
    assert aot.memory_bytes("v5p:2x2x1") == 95 * 2**30
    assert aot.memory_bytes("h100:8") == aot.GPUS["h100"].memory_bytes


def test_gpu_target_config_carries_the_spec():
    text = aot.GPUS["a100"].target_config()
    for field in ("core_count: 108", "cuda_compute_capability { major: 8 minor: 0 }",
                  "shared_memory_per_block_optin: 166912", 'device_description_str: "NVIDIA A100-SXM4-80GB"'):
        assert field in text


def test_blocks_per_sm():
    h100 = aot.GPUS["h100"]
    # 171 registers -> 176 per thread (units of 256 per warp); 8 warps take 45,056 of 65,536: one block.
    assert aot._blocks_per_sm(h100, threads=256, smem=96 * 1024, regs=171) == 1
    # 166 registers -> 168; 4 warps take 21,504: three blocks by registers; 48 KiB shared memory allows 4.
    assert aot._blocks_per_sm(h100, threads=128, smem=48 * 1024, regs=166) == 3
    # shared memory bound: 100 KiB (+1 KiB reserved) twice in 228 KiB
    assert aot._blocks_per_sm(h100, threads=128, smem=100 * 1024, regs=32) == 2
    assert aot._blocks_per_sm(h100, threads=128, smem=0, regs=None) is None
