"""A run directory is a contract; exports generate like polmjax; the CLI's user errors are one message.

Runs are the tiny SFT experiment shrunk to seconds (test_sft_run.SMALL).
"""

import json
import os
import shutil

import numpy as np
import pytest

from polmjax import cli
from polmjax import config as config_lib
from polmjax.checkpoint import CheckpointMismatchError
from polmjax.errors import USER_ERROR
from polmjax.train import rundir, sft
from test_sft_run import SMALL, TINY, _losses


def _cfg(run_dir, *extra):
    return config_lib.load_experiment(TINY, SMALL + [f"train.run_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A finished 4-step run (checkpoints 2 and 4), trained once; a test resumes or changes a copy of it
    (a run directory may move: train.run_dir is an execution setting)."""
    path = tmp_path_factory.mktemp("four_steps")
    sft.run(_cfg(path, "train.steps=4"))
    return path


def _copy(run, dest):
    shutil.copytree(run, dest, dirs_exist_ok=True)
    return dest


def _read(path):
    with open(path) as f:
        return f.read()


def _lrs(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["learning_rate"] for r in map(json.loads, f) if "split" not in r}


def test_changed_config_is_refused_before_anything_is_written_and_the_run_still_exports(tmp_path, four_steps):
    _copy(four_steps, tmp_path)
    before = {name: _read(tmp_path / name) for name in ("config.json", "metrics.jsonl")}
    with pytest.raises(rundir.RunDirError, match=r"model.init.hidden_size: 32 -> 64; optim.lr: 0.005 -> 0.001") as e:
        sft.run(_cfg(tmp_path, "train.steps=4", "model.init.hidden_size=64", "optim.lr=1e-3"))
    assert "train.run_dir=" in e.value.hint and "--allow-config-change" in e.value.hint
    assert {name: _read(tmp_path / name) for name in before} == before
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
    assert sft.export_run(str(tmp_path)).endswith("step_4")

    # --allow-config-change keeps the old config; a checkpoint that does not fit is a mismatch, not damage
    with pytest.raises(CheckpointMismatchError, match="embed: saved shape \\(384, 32\\)"):
        sft.run(_cfg(tmp_path, "train.steps=4", "model.init.hidden_size=64"), allow_config_change=True)
    assert _read(tmp_path / "config.1.json") == before["config.json"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # nothing marked unreadable


def test_execution_settings_may_change_on_resume(tmp_path, caplog, four_steps):
    _copy(four_steps, tmp_path)
    caplog.set_level("INFO")
    result = sft.run(_cfg(tmp_path, "train.steps=4", "train.log_every=2", "mesh.data=2", "train.keep=5"))
    assert int(result.step) == 4
    assert "resuming with changed execution settings: mesh.data: 1 -> 2; train.keep: 2 -> 5; " \
           "train.log_every: 1 -> 2" in caplog.text
    assert config_lib.load_run_config(str(tmp_path)).train.log_every == 2


def test_extending_keeps_the_schedule_horizon_unless_respanned(tmp_path, caplog):
    base = ["optim.warmup_steps=2", "optim.min_lr_ratio=0.1"]
    ref = tmp_path / "ref"
    sft.run(_cfg(ref, "train.steps=6", *base))
    first = _losses(ref)
    caplog.set_level("INFO")
    sft.run(_cfg(ref, "train.steps=8", *base))
    assert "extending the run from 6 to 8 steps; the learning-rate schedule keeps its 6-step horizon, so " \
           "steps 7-8 train at its final rate 5.00e-04" in caplog.text
    lrs = _lrs(ref)
    assert lrs[7] == lrs[8] == pytest.approx(5e-4) and lrs[6] > lrs[7]
    assert config_lib.load_run_config(str(ref)).optim.schedule_steps == 6
    # the extended run equals one run of 8 steps on the 6-step schedule, and its first 6 steps are kept
    sft.run(_cfg(tmp_path / "straight", "train.steps=8", "optim.schedule_steps=6", *base))
    assert _losses(ref) == _losses(tmp_path / "straight") and {s: _losses(ref)[s] for s in first} == first

    caplog.clear()
    sft.run(_cfg(ref, "train.steps=12", "optim.schedule_steps=12", *base))
    assert "re-spanned from 6 to 12 steps: the rate at step 9 changes from 5.00e-04 to" in caplog.text
    assert _lrs(ref)[9] > 5e-4

    with pytest.raises(rundir.RunDirError, match="below the step the run has reached \\(12\\)"):
        sft.run(_cfg(ref, "train.steps=10", "optim.schedule_steps=12", *base))


def test_extending_into_a_zero_learning_rate_is_refused(tmp_path):
    sft.run(_cfg(tmp_path, "train.steps=4", "optim.warmup_steps=1"))  # cosine to 0 (min_lr_ratio 0)
    with pytest.raises(rundir.RunDirError, match="would train steps 5-6 at learning rate 0") as e:
        sft.run(_cfg(tmp_path, "train.steps=6", "optim.warmup_steps=1"))
    assert "--set optim.schedule_steps=6" in e.value.hint
    assert config_lib.load_run_config(str(tmp_path)).train.steps == 4


def test_exported_model_stops_where_polmjax_stops_in_transformers(tmp_path):
    import torch
    import transformers

    from polmjax import models
    from polmjax.data import stop_token_ids
    from polmjax.generate import generate, left_pad

    sft.run(_cfg(tmp_path, "train.steps=150", "optim.lr=1e-2", "optim.warmup_steps=5", "data.max_rows=400",
                 "train.save_every=1000", "train.log_every=50", "train.export_hf=true"))
    hf_dir = str(tmp_path / "export" / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    stops = stop_token_ids(tokenizer)
    hf_config = json.loads(_read(os.path.join(hf_dir, "config.json")))
    generation = json.loads(_read(os.path.join(hf_dir, "generation_config.json")))
    assert stops == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    for cfg in (hf_config, generation):
        assert (cfg["eos_token_id"], cfg["bos_token_id"], cfg["pad_token_id"]) == (
            stops[0], tokenizer.bos_token_id, tokenizer.pad_token_id)

    ours = models.from_pretrained(hf_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    stopped = 0
    for prompt in ["add 1 and 2", "sort: 3 1 2", "reverse: a b", "add 12 and 30"]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        ids = list(ids["input_ids"]) if isinstance(ids, dict) else list(ids)
        padded, mask = left_pad([ids], 0)
        tokens, valid = generate(ours.config, ours.params(), padded, mask, max_new_tokens=16, eos_id=stops)
        mine = np.asarray(tokens)[0][np.asarray(valid)[0]].tolist()
        with torch.no_grad():
            hf = theirs.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        assert hf == mine, prompt
        stopped += len(mine) < 16 and mine[-1] in stops
    assert stopped >= 2  # the check means something: generation did stop at EOS before the limit


# -- CLI: user errors are one message and a hint, exit code 2; --debug shows the traceback ---------------


def _cli_error(capsys, *argv):
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith(("polmjax", "  hint", "  (--debug"))], err


@pytest.mark.parametrize("argv, message", [
    (["sft", "experiments/sft/nope.py"], "polmjax sft: error: experiment file experiments/sft/nope.py does not exist"),
    (["sft", TINY, "--set", "train.stepz=3"], "unknown key 'stepz'; known: run_dir, steps"),
    (["sft", TINY, "--set", "train.steps=0"], "polmjax sft: error: train.steps=0: must be >= 1"),
    (["export", "no/such/run"], "polmjax export: error: no/such/run: no config.json"),
])
def test_cli_user_errors_are_one_message(capsys, argv, message):
    code, lines, err = _cli_error(capsys, *argv)
    assert code == USER_ERROR and message in lines[0] and "Traceback" not in err, err
    assert lines[-1] == "  (--debug shows the traceback)"


def test_cli_bad_data_row_and_missing_checkpoint_step(capsys, tmp_path, four_steps):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    code, lines, err = _cli_error(capsys, "sft", TINY, *[f"--set={s}" for s in SMALL],
                                  f"--set=train.run_dir={tmp_path / 'run'}", f"--set=data.path={data}",
                                  "--set=train.steps=2")
    assert code == USER_ERROR and "Traceback" not in err, err
    assert f"{data} row 3: field 'messages' has no assistant message" in lines[0]  # row 3 == line 3

    ok = str(_copy(four_steps, tmp_path / "ok"))
    code, lines, err = _cli_error(capsys, "export", ok, "--step", "7")
    assert code == USER_ERROR and "no checkpoint step 7" in lines[0] and "available: [2, 4]" in lines[0], err

    with pytest.raises(Exception, match="no checkpoint step 7"):
        cli.main(["--debug", "export", ok, "--step", "7"])
