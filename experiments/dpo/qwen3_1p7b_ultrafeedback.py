"""DPO (sigmoid loss, beta 0.1) of Qwen3-1.7B on UltraFeedback binarized, for a TPU pod slice (or a GPU node).

The pairs are `trl-lib/ultrafeedback_binarized` (62k conversational chosen / rejected pairs with an
implicit prompt, TRL's standard form), downloaded from the hub when online; offline, point data.path
at a local copy (a .jsonl / .parquet file or a `save_to_disk` directory; HuggingFaceH4's
`ultrafeedback_binarized` with split train_prefs works too). Start from an SFT'd model for a real run
(model.path = the export of a `polmjax sft` run, e.g. experiments/sft/qwen3_1p7b_tulu3.py's
runs/qwen3_1p7b_tulu3/export/hf). bf16 compute with fp32 master weights, FSDP over every device, scan
over layers with remat; the reference is a frozen copy of the initial policy, sharded like it.

Each pair is one row's two segments (prompt + chosen, prompt + rejected, each <= seq_len / 2 = 1024
tokens, TRL's max_length), several short pairs packed per row: 64 rows carry ~64-128 pairs a step.
Memory fit, compiled ahead of time from a CPU host (`tpu/aot_compile.py`; a directory holding only the
model's config.json is enough): v5p:2x2x1 (4 chips, 95 GiB each) and v5e:2x4 (8 chips, 16 GiB) — see the README.

    # on every host of the slice; run_dir on a filesystem all hosts share:
    polmjax dpo experiments/dpo/qwen3_1p7b_ultrafeedback.py --set model.path=runs/qwen3_1p7b_tulu3/export/hf \\
        --set train.run_dir=/mnt/shared/runs/qwen3-1p7b-dpo
    # offline data:
    polmjax dpo experiments/dpo/qwen3_1p7b_ultrafeedback.py --set data.path=/data/ultrafeedback_binarized/train.parquet
    # will it fit (config.json only, no weights):
    python tpu/aot_compile.py experiments/dpo/qwen3_1p7b_ultrafeedback.py --target v5p:2x2x1 --set model.path=DIR
"""

from polmjax.data import DataConfig
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.dpo import DPOExperiment
from polmjax.train.optim import OptimConfig


def config() -> DPOExperiment:
    return DPOExperiment(
        model=ModelSource(path="Qwen/Qwen3-1.7B", dtype="float32", compute_dtype="bfloat16",
                          remat="dots_no_batch", scan_layers=True),
        data=DataConfig(path="trl-lib/ultrafeedback_binarized", split="train", format="preference",
                        packing="best_fit", eval_fraction=0.01, skip_bad_rows=True),
        train=TrainConfig(run_dir="runs/qwen3_1p7b_ultrafeedback_dpo", steps=600, global_batch=64, seq_len=2048,
                          log_every=10, eval_every=100, eval_batches=8, save_every=100, keep=3),
        optim=OptimConfig(name="adamw", lr=5e-7, schedule="cosine", warmup_steps=60, min_lr_ratio=0.0,
                          weight_decay=0.0, clip_norm=1.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        loss="sigmoid",
        beta=0.1,
        reference="copy",
    )
