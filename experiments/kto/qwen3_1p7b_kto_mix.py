"""KTO of Qwen3-1.7B on TRL's KTO mix (thumbs-up / thumbs-down answers), for a TPU pod slice (or a GPU node).

The examples are `trl-lib/kto-mix-14k` (13.5k conversational prompt / completion / label rows, TRL's
unpaired form), downloaded from the hub when online; offline, point data.path at a local copy (a
.jsonl / .parquet file or a `save_to_disk` directory). Start from an SFT'd model for a real run
(model.path = the export of a `polmjax sft` run, e.g. experiments/sft/qwen3_1p7b_tulu3.py's
runs/qwen3_1p7b_tulu3/export/hf). bf16 compute with fp32 master weights, FSDP over every device, scan
over layers with remat; the reference is a frozen copy of the initial policy, sharded like it.

Each example is one row's two segments (prompt + its completion, prompt + a mismatched completion for
KTO's KL reference point), each <= seq_len / 2 = 1024 tokens; short examples are packed several per row.

    polmjax kto experiments/kto/qwen3_1p7b_kto_mix.py --set model.path=runs/qwen3_1p7b_tulu3/export/hf \\
        --set train.run_dir=/mnt/shared/runs/qwen3-1p7b-kto
    python tpu/aot_compile.py experiments/kto/qwen3_1p7b_kto_mix.py --target v5p:2x2x1 --set model.path=DIR

Memory fit, compiled ahead of time from a CPU host (config.json only): v5p:2x2x1, 64 x 2048, grad_accum 1:
6.41 GiB arguments (1.60 of them the frozen reference) + 44.20 GiB temporaries = 50.6 of 95 GiB per chip
(compiled in 369 s on the loaded 2-core host).
"""

from polmjax.data import DataConfig
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.kto import KTOExperiment
from polmjax.train.optim import OptimConfig


def config() -> KTOExperiment:
    return KTOExperiment(
        model=ModelSource(path="Qwen/Qwen3-1.7B", dtype="float32", compute_dtype="bfloat16",
                          remat="dots_no_batch", scan_layers=True),
        data=DataConfig(path="trl-lib/kto-mix-14k", split="train", format="unpaired", packing="best_fit",
                        eval_fraction=0.01, skip_bad_rows=True),
        train=TrainConfig(run_dir="runs/qwen3_1p7b_kto_mix", steps=400, global_batch=64, seq_len=2048,
                          log_every=10, eval_every=100, eval_batches=8, save_every=100, keep=3),
        optim=OptimConfig(name="adamw", lr=5e-7, schedule="cosine", warmup_steps=40, min_lr_ratio=0.0,
                          weight_decay=0.0, clip_norm=1.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        loss="kto",
        beta=0.1,
        reference="copy",
    )
