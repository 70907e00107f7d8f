"""polmjax command line.

  polmjax sft EXPERIMENT.py [--set key=value ...]   supervised fine-tuning (resumes from run_dir if present)
  polmjax dpo EXPERIMENT.py [--set key=value ...]   DPO and its family (loss= in the experiment), same contract
  polmjax kto EXPERIMENT.py [--set key=value ...]   KTO / unpaired APO-zero on prompt/completion/label data
  polmjax grpo EXPERIMENT.py [--set key=value ...]  GRPO family RL: sample, verify, update, in one program
  polmjax quickstart [--out DIR] [--model HF_DIR] [--data FILE] [--set stage.key=value ...]
                                        the whole pipeline (SFT -> reward model -> DPO -> GRPO) on one
                                        verifiable task, evaluated on held-out prompts (polmjax.quickstart)
  polmjax export RUN_DIR [--step N] [--out DIR]    a checkpoint as an HF model directory (+ PEFT adapter)
  polmjax demo [--out DIR]              build a tiny Llama-style model, save it as an HF directory, reload it
                                        sharded over every local device, compare its logits with
                                        transformers' (when torch is installed), decode with a KV cache
  polmjax logits MODEL_DIR [--ids 1,2,3] load an HF model directory and print its next-token predictions

Exit codes: 0 done, 2 a user error (config, data, checkpoint, missing file: one message and a hint; the
traceback with --debug), 3 a run preempted (SIGTERM/SIGINT) that saved and stopped, 1 a crash.
"""


from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from polmjax.errors import USER_ERROR, UserError

# command -> (module, experiment class, run function)
ALGORITHMS = {"sft": ("polmjax.train.sft", "SFTExperiment", "run"),
              "dpo": ("polmjax.train.dpo", "DPOExperiment", "run"),
              "rm": ("polmjax.train.rm", "RMExperiment", "run"),
              "kto": ("polmjax.train.kto", "KTOExperiment", "run"),
              "grpo": ("polmjax.train.grpo", "GRPOExperiment", "run")}
PREEMPTED = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polmjax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ALGORITHMS:
        p = sub.add_parser(name, help=f"{name.upper()} training from an experiment file")
        p.add_argument("experiment", help="experiments/<algo>/<name>.py")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.steps=100 (repeatable)")
        p.add_argument("--allow-config-change", action="store_true",
                       help="continue a run directory whose saved config differs (the old one is kept as "
                            "config.<n>.json; its checkpoints must still fit)")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    quick = sub.add_parser("quickstart", help="SFT -> reward model -> DPO -> GRPO on one task, with a table")
    quick.add_argument("--out", default="runs/quickstart", help="where every stage's run directory goes")
    quick.add_argument("--model", default="", help="an HF model directory to start from (default: a tiny model)")
    quick.add_argument("--data", default="", help="prompt + answer (+ solution) JSONL (default: toy tasks)")
    quick.add_argument("--seed", type=int, default=0)
    quick.add_argument("--demo-noise", type=float, default=0.6,
                       help="toy data: the fraction of 'sort' demonstrations sorted descending (0: no flaw)")
    quick.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                       help="override a stage's experiment, e.g. --set grpo.train.steps=100 (repeatable)")
    demo = sub.add_parser("demo", help="tiny end-to-end check of models, HF interop, sharding and decoding")
    demo.add_argument("--out", default="runs/demo", help="where the HF model directory is written")
    exp = sub.add_parser("export", help="export a run's checkpoint as an HF model directory (+ PEFT adapter)")
    exp.add_argument("run_dir")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest readable)")
    exp.add_argument("--out", default=None, help="output directory (default: RUN_DIR/export/step_<step>)")
    logits = sub.add_parser("logits", help="print next-token predictions of an HF model directory")
    logits.add_argument("model_dir")
    logits.add_argument("--ids", default="1,2,3,4", help="comma-separated input token ids")
    logits.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    for p in (quick, demo, exp, logits):
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return _dispatch(args)
    except (UserError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"polmjax {args.command}: error: {e}", file=sys.stderr)
        if getattr(e, "hint", ""):
            print(f"  hint: {e.hint}", file=sys.stderr)
        print("  (--debug shows the traceback)", file=sys.stderr)
        return USER_ERROR


def _dispatch(args) -> int:
    from polmjax.mesh import initialize_distributed

    initialize_distributed()
    if args.command in ALGORITHMS:
        return _train(args.command, args.experiment, args.overrides, args.allow_config_change)
    if args.command == "quickstart":
        from polmjax.quickstart import Settings, main as quickstart

        quickstart(Settings(out=args.out, model=args.model, data=args.data, seed=args.seed,
                            demo_noise=args.demo_noise), args.overrides)
        return 0
    if args.command == "export":
        from polmjax.train.run import export_run

        print(export_run(args.run_dir, args.step, args.out))
        return 0
    if args.command == "demo":
        return _demo(args.out)
    try:
        ids = [int(t) for t in args.ids.split(",")]
    except ValueError:
        raise UserError(f"--ids {args.ids!r}: expected comma-separated integers, e.g. 1,2,3") from None
    return _logits(args.model_dir, ids, args.dtype)


def _quiet_libraries() -> None:
    """Our log format at INFO; start-up chatter of libraries that does not concern a user silenced."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # "PyTorch was not found..."
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file operation at INFO
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)  # "Unable to initialize backend 'tpu'"
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _train(command: str, experiment: str, overrides: list[str], allow_config_change: bool) -> int:
    import importlib

    from polmjax.config import ConfigError, load_experiment

    module_name, class_name, fn_name = ALGORITHMS[command]
    module = importlib.import_module(module_name)
    cfg = load_experiment(experiment, overrides)
    if not isinstance(cfg, getattr(module, class_name)):
        raise ConfigError(f"{experiment}: config() returns {type(cfg).__name__}, but `polmjax {command}` needs "
                          f"{class_name}")
    result = getattr(module, fn_name)(cfg, allow_config_change=allow_config_change)
    return PREEMPTED if result.preempted else 0


def _demo(out: str) -> int:
    import jax
    import numpy as np

    from polmjax import models
    from polmjax.mesh import make_mesh

    cfg = models.ModelConfig(
        family="llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=8,
        num_kv_heads=2, head_dim=16, rope=models.RopeConfig(theta=500000.0),
    )
    model = models.create(cfg, seed=0)
    path = os.path.join(out, "model")
    models.save_pretrained(model, path)
    print(f"saved a {cfg.num_params() / 1e6:.2f}M-parameter {cfg.family} model to {path}/ "
          f"({', '.join(sorted(os.listdir(path)))})")

    mesh = make_mesh(data=1, fsdp=-1, tensor=1)
    sharded = models.from_pretrained(path, mesh=mesh)
    print(f"reloaded over mesh {dict(mesh.shape)} on {jax.devices()[0].platform}")
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12))
    t0 = time.perf_counter()
    logits = np.asarray(jax.jit(lambda m, x: m(x))(sharded, ids))
    print(f"logits {logits.shape} in {time.perf_counter() - t0:.2f}s (incl. compile); "
          f"max |reloaded - original| = {np.abs(logits - np.asarray(model(ids))).max():.2e}")
    hf_err = _transformers_logits_error(path, ids, logits)
    if hf_err is None:
        print("transformers check skipped: torch is not installed (pip install torch==2.13.0 for the CPU build)")
    else:
        print(f"transformers {type(hf_err[1]).__name__} loads {path}/: max |transformers - polmjax| logits = "
              f"{hf_err[0]:.2e}")

    step = jax.jit(lambda m, x, c: m(x, cache=c))
    out_logits, cache = step(sharded, ids[:, :4], sharded.init_cache(2, 12))
    decoded = [np.asarray(out_logits)]
    for t in range(4, 12):
        out_logits, cache = step(sharded, ids[:, t:t + 1], cache)
        decoded.append(np.asarray(out_logits))
    err = np.abs(np.concatenate(decoded, 1) - logits).max()
    print(f"KV-cache decode (prefill 4 + 8 single-token steps) vs full forward: max |diff| = {err:.2e}")
    return 0 if err < 1e-4 and (hf_err is None or hf_err[0] < 1e-4) else 1


def _transformers_logits_error(path: str, ids, logits):
    """(max |transformers logits - ours|, the HF model) for the saved directory, or None without torch."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return None
    import numpy as np
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(np.asarray(ids))).logits.numpy()
    return float(np.abs(ref - logits).max()), hf


def _logits(model_dir: str, ids: list[int], dtype: str) -> int:
    import jax.numpy as jnp
    import numpy as np

    from polmjax import models

    model = models.from_pretrained(model_dir, dtype=jnp.dtype(dtype))
    logits = np.asarray(model(np.asarray([ids])))[0]
    print(f"{model.config.family}: {model.config.num_params() / 1e6:.1f}M parameters, logits {logits.shape}")
    for t, row in enumerate(logits):
        top = np.argsort(-row)[:5]
        pairs = ", ".join(f"{tok}:{row[tok]:.3f}" for tok in top)
        print(f"  position {t} (token {ids[t]}): top next tokens (id:logit) {pairs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
