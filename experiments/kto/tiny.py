"""Tiny KTO on CPU: the tiny SFT model learns from thumbs-up / thumbs-down answers, no pairs needed.

Start from the model the tiny SFT experiment exports (run it first: `polmjax sft experiments/sft/tiny.py`);
the data are 4,000 offline toy unpaired examples (prompt, completion = the right answer labelled true or
a near miss labelled false, about half each) in TRL's conversational format, with a 5% held-out split.
Each example also carries its prompt with another example's completion, from which KTO estimates its
KL reference point:

    polmjax kto experiments/kto/tiny.py
    polmjax kto experiments/kto/tiny.py --set loss=apo_zero_unpaired --set train.run_dir=runs/kto_tiny_apo
"""

from polmjax.data import DataConfig
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.kto import KTOExperiment
from polmjax.train.optim import OptimConfig


def config() -> KTOExperiment:
    return KTOExperiment(
        model=ModelSource(path="runs/sft_tiny/export/hf"),
        data=DataConfig(path="toy:unpaired", packing="best_fit", eval_fraction=0.05),
        train=TrainConfig(run_dir="runs/kto_tiny", steps=200, global_batch=16, seq_len=128, log_every=10,
                          eval_every=100, eval_batches=5, save_every=100, keep=2),  # 5 batches: all 192 held-out
        optim=OptimConfig(name="adamw", lr=1e-3, schedule="cosine", warmup_steps=5, weight_decay=0.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        loss="kto",
        beta=0.1,
    )
