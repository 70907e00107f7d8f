"""`tpu/aot_compile.py` compiles the step of any algorithm's experiment: the DPO step (with its frozen
reference model) compiles and fits on a TPU topology from this CPU host (needs libtpu)."""

import glob
import os
import pathlib
import sys

import pytest

from polmjax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tpu"))

from aot_compile import algorithm_of, compile_step

EXPERIMENTS = sorted(p for p in glob.glob(os.path.join(ROOT, "experiments", "*", "*.py"))
                     if os.path.basename(os.path.dirname(p)) != "benchmarks" and "\ndef config(" in pathlib.Path(p).read_text())


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_experiment_maps_to_its_algorithm(path):
    algorithm = algorithm_of(config_lib.load_experiment(path))
    assert algorithm.name == os.path.basename(os.path.dirname(path))


def test_an_unknown_experiment_class_is_named():
    with pytest.raises(ValueError, match="test_tpu_aot_dpo.NotAnExperiment: not an experiment of a known"):
        algorithm_of(NotAnExperiment())


class NotAnExperiment:
    pass


@pytest.mark.tpu_aot
def test_tiny_dpo_step_compiles_and_fits(tmp_path):
    pytest.importorskip("libtpu", reason="libtpu (pip install 'jax[tpu]') provides the TPU compiler")
    from hf_models import hf_config

    hf_config("qwen3").save_pretrained(tmp_path)  # config.json only: aot_compile reads no weights
    common = [f"model.path={tmp_path}", "mesh.data=2", "mesh.fsdp=2", "train.global_batch=8", "train.seq_len=64"]
    tiny = os.path.join(ROOT, "experiments", "dpo", "tiny.py")
    copy = compile_step(tiny, "v5e:2x2", common)
    assert copy["fits"] and copy["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert copy["algorithm"] == "dpo (loss sigmoid, reference auto)"
    assert copy["pallas_kernel_calls"] >= 3  # fused log-probs: policy forward and backward, reference forward
    # the reference is a frozen copy sharded like the policy: it adds one copy of the parameters' (padded)
    # bytes per device, of which the AdamW state holds three (params, mu, nu); a replicated one, 4x that
    free = compile_step(tiny, "v5e:2x2", common + ["loss=simpo", "reference=none", 'loss_kwargs={"gamma": 0.5}'])
    assert free["bytes"]["frozen"] == 0 and copy["bytes"]["frozen"] > 0
    reference = copy["bytes"]["arguments"] - free["bytes"]["arguments"]
    assert reference >= copy["bytes"]["frozen"]
    assert 0 < free["bytes"]["arguments"] - 3 * reference < 0.01 * free["bytes"]["arguments"]  # + batch, step
