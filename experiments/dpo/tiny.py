"""Tiny DPO on CPU: the tiny SFT model learns to rank right answers above wrong ones.

Start from the model the tiny SFT experiment exports (run it first: `polmjax sft experiments/sft/tiny.py`);
the data are 4,000 offline toy preference pairs (prompt, chosen = the right answer, rejected = a near
miss) in TRL's conversational format, with a 5% held-out split. Any loss of the DPO family is one flag:

    polmjax dpo experiments/dpo/tiny.py
    polmjax dpo experiments/dpo/tiny.py --set loss=ipo --set train.run_dir=runs/dpo_tiny_ipo
    polmjax dpo experiments/dpo/tiny.py --set loss=simpo --set reference=none --set 'loss_kwargs={"gamma": 0.5}'
"""

from polmjax.data import DataConfig
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.dpo import DPOExperiment
from polmjax.train.optim import OptimConfig


def config() -> DPOExperiment:
    return DPOExperiment(
        model=ModelSource(path="runs/sft_tiny/export/hf"),
        data=DataConfig(path="toy:preference", packing="best_fit", eval_fraction=0.05),
        train=TrainConfig(run_dir="runs/dpo_tiny", steps=400, global_batch=16, seq_len=128, log_every=10,
                          eval_every=100, eval_batches=5, save_every=100, keep=2),  # 5 x 40 = all 200 held-out pairs
        optim=OptimConfig(name="adamw", lr=1e-3, schedule="cosine", warmup_steps=10, weight_decay=0.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        loss="sigmoid",
        beta=0.1,
    )
