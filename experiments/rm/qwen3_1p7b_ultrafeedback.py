"""A reward model from Qwen3-1.7B on UltraFeedback binarized (Bradley-Terry), for a TPU pod slice (or a GPU node).

The pairs are `trl-lib/ultrafeedback_binarized` (62k conversational chosen / rejected pairs with an
implicit prompt), downloaded from the hub when online; offline, point data.path at a local copy (a
.jsonl / .parquet file or a `save_to_disk` directory; HuggingFaceH4's `ultrafeedback_binarized` with
split train_prefs works too). The causal LM gets a new scalar head (model.num_labels = 1); a
`*ForSequenceClassification` checkpoint keeps its own. bf16 compute with fp32 master weights, FSDP over
every device, scan over layers with remat; reward centring as TRL recommends (Eisenstein et al. 2023).
The export in run_dir/export/hf is a `Qwen3ForSequenceClassification` that `transformers` loads.

Each pair is one row's two segments (each <= seq_len / 2 = 1024 tokens), short pairs packed per row.
Memory fit, compiled ahead of time from a CPU host (`tpu/aot_compile.py`; a directory with only the
model's config.json is enough, plus a tokenizer for the pad id: `--set model.tokenizer=toy` will do
for a memory figure): v5p:2x2x1 (4 chips, 95 GiB each) — see the README.

    # on every host of the slice; run_dir on a filesystem all hosts share:
    polmjax rm experiments/rm/qwen3_1p7b_ultrafeedback.py --set train.run_dir=/mnt/shared/runs/qwen3-1p7b-rm
    # offline data:
    polmjax rm experiments/rm/qwen3_1p7b_ultrafeedback.py --set data.path=/data/ultrafeedback_binarized/train.parquet
"""

from polmjax.data import DataConfig
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.optim import OptimConfig
from polmjax.train.rm import RMExperiment


def config() -> RMExperiment:
    return RMExperiment(
        model=ModelSource(path="Qwen/Qwen3-1.7B", dtype="float32", compute_dtype="bfloat16",
                          remat="dots_no_batch", scan_layers=True, num_labels=1),
        data=DataConfig(path="trl-lib/ultrafeedback_binarized", split="train", format="preference",
                        packing="best_fit", eval_fraction=0.01, skip_bad_rows=True),
        train=TrainConfig(run_dir="runs/qwen3_1p7b_ultrafeedback_rm", steps=600, global_batch=64, seq_len=2048,
                          log_every=10, eval_every=100, eval_batches=8, save_every=100, keep=3),
        optim=OptimConfig(name="adamw", lr=1e-5, schedule="cosine", warmup_steps=30, min_lr_ratio=0.0,
                          weight_decay=0.0, clip_norm=1.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        center_rewards_coefficient=0.01,
    )
