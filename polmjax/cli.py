"""polmjax command line.

  polmjax sft EXPERIMENT.py [--set key=value ...]   supervised fine-tuning (resumes from run_dir if present)
  polmjax export RUN_DIR [--step N] [--out DIR]    a checkpoint as an HF model directory (+ PEFT adapter)
  polmjax demo [--out DIR]              build a tiny Llama-style model, save it as an HF directory, reload it
                                        sharded over every local device, print logits, decode with a KV cache
  polmjax logits MODEL_DIR [--ids 1,2,3] load an HF model directory and print its next-token predictions
"""


from __future__ import annotations

import argparse
import os
import sys
import time

# command -> (module, experiment class, run function)
ALGORITHMS = {"sft": ("polmjax.train.sft", "SFTExperiment", "run")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="polmjax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ALGORITHMS:
        p = sub.add_parser(name, help=f"{name.upper()} training from an experiment file")
        p.add_argument("experiment", help="experiments/<algo>/<name>.py")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.steps=100 (repeatable)")
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
    args = parser.parse_args(argv)
    from polmjax.mesh import initialize_distributed

    initialize_distributed()
    if args.command in ALGORITHMS:
        return _train(args.command, args.experiment, args.overrides)
    if args.command == "export":
        from polmjax.train.sft import export_run

        print(export_run(args.run_dir, args.step, args.out))
        return 0
    if args.command == "demo":
        return _demo(args.out)
    return _logits(args.model_dir, [int(t) for t in args.ids.split(",")], args.dtype)


def _train(command: str, experiment: str, overrides: list[str]) -> int:
    import importlib
    import logging

    from polmjax.config import load_experiment

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file operation at INFO
    module_name, class_name, fn_name = ALGORITHMS[command]
    module = importlib.import_module(module_name)
    cfg = load_experiment(experiment, overrides)
    if not isinstance(cfg, getattr(module, class_name)):
        raise SystemExit(f"{experiment}: config() returns {type(cfg).__name__}, but `polmjax {command}` needs "
                         f"{class_name}")
    result = getattr(module, fn_name)(cfg)
    return 3 if result.preempted else 0


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

    step = jax.jit(lambda m, x, c: m(x, cache=c))
    out_logits, cache = step(sharded, ids[:, :4], sharded.init_cache(2, 12))
    decoded = [np.asarray(out_logits)]
    for t in range(4, 12):
        out_logits, cache = step(sharded, ids[:, t:t + 1], cache)
        decoded.append(np.asarray(out_logits))
    err = np.abs(np.concatenate(decoded, 1) - logits).max()
    print(f"KV-cache decode (prefill 4 + 8 single-token steps) vs full forward: max |diff| = {err:.2e}")
    return 0 if err < 1e-4 else 1


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
