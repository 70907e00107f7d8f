"""End-to-end SFT runs: experiment files parse, loss falls, SIGKILL + restart == uninterrupted run."""

import glob
import json
import os
import shutil

import jax
import pytest
from kill_restart import check_sigkill_and_restart

from polmjax import config as config_lib
from polmjax import models
from polmjax.train import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "experiments", "sft", "tiny.py")
# a smaller model and dataset so a run takes seconds; 96 rows at 8 per batch cross epochs every few steps
SMALL = ["model.init.hidden_size=32", "model.init.intermediate_size=64", "model.init.num_layers=2",
         "model.init.head_dim=8", "data.max_rows=96", "data.eval_fraction=0.0", "train.eval_every=0",
         "train.global_batch=8", "train.seq_len=64", "train.log_every=1", "train.save_every=2",
         "train.sample_prompts=[]", "train.export_hf=false", "train.async_save=false"]


EXPERIMENTS = sorted(p for p in glob.glob(os.path.join(ROOT, "experiments", "*", "*.py"))
                     if os.path.basename(os.path.dirname(p)) != "benchmarks"
                     and not os.path.basename(p).startswith(("prepare", "_")))  # data-preparation scripts


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: os.path.relpath(p, ROOT))
def test_experiment_files_load_and_shape_check(path):
    cfg = config_lib.load_experiment(path)
    json.dumps(config_lib.to_dict(cfg))
    if cfg.model.init is not None:
        init = cfg.model.init.replace(vocab_size=cfg.model.init.vocab_size or 384)
        shapes = jax.eval_shape(lambda: models.init_params(init, jax.random.key(0)))
        assert sum(x.size for x in jax.tree.leaves(shapes)) == init.num_params() + init.num_layers * (
            2 * init.hidden_size + (2 * init.head_dim if init.qk_norm else 0)) + init.hidden_size
    else:
        assert cfg.model.path


def test_overrides_parse_and_fail_clearly():
    cfg = config_lib.load_experiment(TINY, ["train.steps=7", "optim.lr=1e-3", "lora.rank=4",
                                            "lora.targets=[\"q\",\"v\"]", "train.wandb_project=null",
                                            "model.init.scan_layers=true"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.lora.rank == 4 and cfg.lora.targets == ("q", "v")
    assert cfg.model.init.scan_layers is True
    with pytest.raises(config_lib.ConfigError, match="unknown key 'stepz'; known: run_dir, steps"):
        config_lib.load_experiment(TINY, ["train.stepz=3"])
    with pytest.raises(config_lib.ConfigError, match="train.steps='many'"):
        config_lib.load_experiment(TINY, ["train.steps=many"])
    with pytest.raises(ValueError, match="not divisible by train.grad_accum=3"):
        config_lib.load_experiment(TINY, ["train.grad_accum=3"])


def _cfg(run_dir, *extra):
    return config_lib.load_experiment(TINY, SMALL + [f"train.run_dir={run_dir}", *extra])


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "split" not in r}


def test_loss_falls_and_lora_trains_only_adapters(tmp_path):
    result = sft.run(_cfg(tmp_path / "full", "train.steps=30", "optim.warmup_steps=3", "optim.lr=1e-2"))
    losses = _losses(tmp_path / "full")
    assert int(result.step) == 30 and sorted(losses) == list(range(1, 31))
    assert sum(losses[s] for s in range(26, 31)) < 0.6 * sum(losses[s] for s in range(1, 6))

    lora = sft.run(_cfg(tmp_path / "lora", "train.steps=3", "lora.rank=4", "train.export_hf=true"))
    assert set(lora.state.params["layers"]) == {f"{p}_lora_{ab}" for p in "qkvo" for ab in "ab"}
    assert os.path.exists(tmp_path / "lora" / "export" / "adapter" / "adapter_model.safetensors")
    assert os.path.exists(tmp_path / "lora" / "export" / "hf" / "model.safetensors")


def test_sigkill_and_restart_equals_uninterrupted(tmp_path):
    """Metrics and final parameters bit-exact, across several epochs (96 rows, 8 a batch, 14 steps)."""
    check_sigkill_and_restart(tmp_path, "sft", TINY, SMALL + ["mesh.data=2"], steps=14, kill_after=7)


def test_corrupt_newest_checkpoint_falls_back(tmp_path, caplog):
    sft.run(_cfg(tmp_path, "train.steps=4"))
    newest = tmp_path / "checkpoints" / "4"
    for f in glob.glob(str(newest / "state" / "**" / "*"), recursive=True):
        if os.path.isfile(f) and os.path.getsize(f) > 64:
            with open(f, "r+b") as fh:
                fh.truncate(16)
    result = sft.run(_cfg(tmp_path, "train.steps=6"))
    assert int(result.step) == 6
    ref = tmp_path / "ref"
    sft.run(_cfg(ref, "train.steps=6"))
    assert _losses(tmp_path) == _losses(ref)
    shutil.rmtree(ref)


def test_export_any_checkpoint(tmp_path):
    import numpy as np
    import transformers

    result = sft.run(_cfg(tmp_path, "train.steps=4", "lora.rank=4", "lora.targets=[\"q\",\"up\"]"))
    out = sft.export_run(str(tmp_path), step=2)
    assert out.endswith("step_2") and os.path.exists(os.path.join(out, "adapter", "adapter_config.json"))
    with pytest.raises(Exception, match="no checkpoint step 3"):
        sft.export_run(str(tmp_path), step=3)
    latest = sft.export_run(str(tmp_path))  # newest: step 4 == the final state
    hf = transformers.AutoModelForCausalLM.from_pretrained(latest)
    ids = np.random.RandomState(0).randint(3, 300, (1, 12))
    with __import__("torch").no_grad():
        ref = hf(input_ids=__import__("torch").as_tensor(ids)).logits.numpy()
    from polmjax.models import lora as lora_lib
    from polmjax.train.state import combine_params

    exp = config_lib.load_run_config(str(tmp_path))
    model = sft.load_model(exp.model, exp.lora, transformers.AutoTokenizer.from_pretrained(latest), None, 0)
    model = models.Decoder(model.config, combine_params(jax.device_get(result.state.params),
                                                        lora_lib.split(model.params())[1]))
    np.testing.assert_allclose(np.asarray(model(ids)), ref, atol=1e-4, rtol=0)
