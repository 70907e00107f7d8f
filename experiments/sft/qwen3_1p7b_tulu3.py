"""Full fine-tuning of Qwen3-1.7B on the Tulu 3 SFT mixture, for a TPU pod slice (or a GPU node).

Downloads the model and dataset from the hub when online (or set model.path / data.path to local
copies). bf16 compute with fp32 master weights, FSDP over every device, scan over layers with remat.

    # on every host of a v5p-32 / v6e-32 slice; run_dir must be on a filesystem all hosts share:
    polmjax sft experiments/sft/qwen3_1p7b_tulu3.py --set train.run_dir=/mnt/shared/runs/qwen3-1p7b-tulu3
    # LoRA on a single host instead:
    polmjax sft experiments/sft/qwen3_1p7b_tulu3.py --set lora.rank=64 --set lora.alpha=128 --set optim.lr=2e-4
"""

from polmjax.data import DataConfig
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.optim import OptimConfig
from polmjax.train.sft import SFTExperiment


def config() -> SFTExperiment:
    return SFTExperiment(
        model=ModelSource(path="Qwen/Qwen3-1.7B", dtype="float32", compute_dtype="bfloat16",
                          remat="dots_no_batch", scan_layers=True),
        data=DataConfig(path="allenai/tulu-3-sft-mixture", split="train", format="messages",
                        packing="best_fit", eval_fraction=0.002, skip_bad_rows=True),
        train=TrainConfig(run_dir="runs/qwen3_1p7b_tulu3", steps=4000, global_batch=128, seq_len=4096,
                          log_every=10, eval_every=500, eval_batches=8, save_every=250, keep=3,
                          sample_prompts=("Write a haiku about gradient descent.",
                                          "What is 17 * 23? Think step by step."),
                          max_new_tokens=128),
        optim=OptimConfig(name="adamw", lr=1e-5, schedule="cosine", warmup_steps=100, min_lr_ratio=0.1,
                          weight_decay=0.0, clip_norm=1.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        reduction="token",
    )
