"""End-to-end DPO runs through the shared run: learning, LoRA reference, exact resume, export, errors."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
from kill_restart import TINY_INIT, check_sigkill_and_restart

from polmjax import config as config_lib
from polmjax.models import ModelConfig, RopeConfig
from polmjax.train import dpo, run as run_lib
from polmjax.train.config import ModelSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "dpo", "tiny.py")
SMALL_MODEL = ModelSource(init=ModelConfig(family="qwen3", vocab_size=0, hidden_size=32, intermediate_size=64,
                                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                                           tie_embeddings=True, rope=RopeConfig(theta=10000.0)),
                          tokenizer="toy")
SMALL = ["data.max_rows=400", "train.global_batch=8", "train.seq_len=64", "train.log_every=1",
         "train.save_every=2", "train.eval_batches=1", "train.sample_prompts=[]", "train.export_hf=false",
         "train.async_save=false", "optim.warmup_steps=2"]


def _cfg(run_dir, *extra):
    exp = config_lib.load_experiment(TINY, SMALL + [f"train.run_dir={run_dir}", *extra])
    return dataclasses.replace(exp, model=SMALL_MODEL)


def _rows(run_dir, split=None):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r.get("split") == split}


@pytest.mark.slow  # CI time: the resume test below also trains below ln 2
def test_dpo_lowers_held_out_loss_and_ranks_pairs(tmp_path):
    dpo.run(_cfg(tmp_path, "train.steps=24", "train.eval_every=12", "train.save_every=24", "optim.lr=3e-3", "train.export_hf=true"))
    train, held_out = _rows(tmp_path), _rows(tmp_path, "eval")
    assert abs(train[1]["loss"] - np.log(2)) < 1e-6  # policy == reference at step 1
    assert abs(train[1]["rewards/margins"]) < 1e-6
    assert held_out[24]["loss"] < held_out[12]["loss"] < np.log(2)
    assert held_out[24]["rewards/accuracies"] > 0.6 and held_out[24]["rewards/margins"] > 0
    assert held_out[24]["pairs"] >= 8
    assert os.path.exists(tmp_path / "export" / "hf" / "model.safetensors")


def test_lora_reference_is_the_base_and_resume_is_exact(tmp_path):
    """LoRA adapters start at zero, so the first loss is ln 2 against the base; deleting the last
    checkpoints and rerunning (a crash after step 4) reproduces steps 5-8 bit for bit."""
    cfg = _cfg(tmp_path, "train.steps=8", "lora.rank=4", "optim.lr=1e-2", "train.keep=10")
    dpo.run(cfg)
    first = _rows(tmp_path)
    assert abs(first[1]["loss"] - np.log(2)) < 1e-6 and first[8]["loss"] < np.log(2)
    for step in (6, 8):
        shutil.rmtree(tmp_path / "checkpoints" / str(step))
    dpo.run(cfg)
    again = _rows(tmp_path)  # later lines overwrite: steps 5-8 come from the resumed run
    for step in range(5, 9):
        assert again[step]["loss"] == first[step]["loss"], step
    out = run_lib.export_run(str(tmp_path), step=8)
    assert os.path.exists(os.path.join(out, "adapter", "adapter_model.safetensors"))
    assert os.path.exists(os.path.join(out, "model.safetensors"))


@pytest.mark.slow  # three CLI runs (~1 min); test_lora_reference_is_the_base_and_resume_is_exact covers resume
def test_sigkill_and_restart_equals_uninterrupted(tmp_path):
    """`polmjax dpo` killed with SIGKILL after a checkpoint and rerun: metrics and final parameters bit-exact."""
    check_sigkill_and_restart(tmp_path, "dpo", TINY, SMALL + TINY_INIT + ["train.eval_every=0", "mesh.data=2"],
                              steps=10, kill_after=5)


@pytest.mark.slow  # CI time: SimPO's step is covered by test_dpo_step and test_step_compile
def test_reference_free_loss_runs_without_a_reference(tmp_path):
    result = dpo.run(_cfg(tmp_path, "train.steps=2", "loss=simpo", "reference=none", 'loss_kwargs={"gamma": 0.5}'))
    assert int(result.step) == 2 and "rewards/accuracies" in _rows(tmp_path)[2]


@pytest.mark.parametrize("override, message", [
    ("loss=dpoo", "loss='dpoo': expected one of"),
    ("reference=none", "loss='sigmoid' needs a reference model"),
    ("reference=base", "reference='base' is the LoRA base"),
    ('loss_kwargs={"gama": 1}', r"loss_kwargs \['gama'\]: loss 'sigmoid' takes \['label_smoothing'\]"),
])
def test_bad_settings_are_named(override, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.load_experiment(TINY, [override])


@pytest.mark.slow  # CI time: three runs
def test_precomputed_reference_equals_the_reference_model_and_is_cached(tmp_path, caplog):
    """reference='precomputed' trains like reference='copy' (same losses, no reference forward), and a
    restarted run reads run_dir/reference_logps instead of recomputing it."""
    common = ["train.steps=3", "optim.lr=1e-2", "optim.schedule=constant", "train.eval_every=3",
              "data.eval_fraction=0.05"]
    dpo.run(_cfg(tmp_path / "copy", *common, "reference=copy"))
    dpo.run(_cfg(tmp_path / "pre", *common, "reference=precomputed"))
    copy, pre = _rows(tmp_path / "copy"), _rows(tmp_path / "pre")
    for step in range(1, 4):
        np.testing.assert_allclose(pre[step]["loss"], copy[step]["loss"], rtol=1e-5, err_msg=str(step))
    np.testing.assert_allclose(_rows(tmp_path / "pre", "eval")[3]["rewards/margins"],
                               _rows(tmp_path / "copy", "eval")[3]["rewards/margins"], rtol=1e-4)
    cache = tmp_path / "pre" / "reference_logps"
    assert sorted(os.listdir(cache)) == ["eval.npz", "train.npz"]
    mtime = os.path.getmtime(cache / "train.npz")
    with caplog.at_level("INFO", logger="polmjax"):
        dpo.run(_cfg(tmp_path / "pre", *common, "reference=precomputed", "train.steps=4"))
    assert os.path.getmtime(cache / "train.npz") == mtime
    assert "computed and cached" not in caplog.text and max(_rows(tmp_path / "pre")) == 4
