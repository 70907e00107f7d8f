"""Tiny SFT on CPU: a 4-layer Qwen3-style model learns toy tasks (add, reverse, sort) from scratch.

Everything is built offline in the run directory: a byte-level BPE tokenizer with a ChatML template
and 4,000 toy conversations in TRL's `messages` format (loss on assistant turns only, best-fit packing).

    polmjax sft experiments/sft/tiny.py
    polmjax sft experiments/sft/tiny.py --set train.steps=50 --set lora.rank=8   # LoRA instead of full FT
"""

from polmjax.data import DataConfig
from polmjax.models import ModelConfig, RopeConfig
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.optim import OptimConfig
from polmjax.train.sft import SFTExperiment


def config() -> SFTExperiment:
    return SFTExperiment(
        model=ModelSource(
            init=ModelConfig(family="qwen3", vocab_size=0, hidden_size=128, intermediate_size=384, num_layers=4,
                             num_heads=4, num_kv_heads=2, head_dim=32, qk_norm=True, tie_embeddings=True,
                             rope=RopeConfig(theta=10000.0)),
            tokenizer="toy",
        ),
        data=DataConfig(path="toy:sft", packing="best_fit", eval_fraction=0.05),
        train=TrainConfig(run_dir="runs/sft_tiny", steps=400, global_batch=32, seq_len=128, log_every=25,
                          eval_every=100, eval_batches=2, save_every=100, keep=2,
                          sample_prompts=("add 12 and 30", "reverse: c a t", "sort: 3 1 2")),
        optim=OptimConfig(name="adamw", lr=5e-3, schedule="cosine", warmup_steps=20, weight_decay=0.01),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
    )
