"""Tiny reward model on CPU: the tiny SFT model gets a scalar head and learns to score right answers to the
toy tasks (add, reverse, sort) above near misses.

Start from the model the tiny SFT experiment exports (run it first: `polmjax sft experiments/sft/tiny.py`);
loading that causal LM as a reward model drops its LM head and draws a new `score` head, as
`AutoModelForSequenceClassification` does. The data are 4,000 offline toy preference pairs (prompt,
chosen = the right answer, rejected = a near miss) in TRL's conversational format, 5% held out; held-out
accuracy (reward of chosen > reward of rejected) and margin are logged every `eval_every` steps. The
export in run_dir/export/hf is a `Qwen3ForSequenceClassification` that `transformers` loads.

Measured (shared 2-core CPU, 11:44 for 600 steps): held-out accuracy 0.72 / 0.825 / 0.815 / 0.83 / 0.825 /
0.825 at steps 100..600 (sort 0.97, reverse 0.92, add 0.58 at the end: telling a sum from a near miss needs
the arithmetic). From scratch (the SFT experiment's model config, lr 1e-3, 300 steps) reached 0.80.

    polmjax rm experiments/rm/tiny.py
    polmjax rm experiments/rm/tiny.py --set center_rewards_coefficient=0.01 --set train.run_dir=runs/rm_tiny_centred
"""

from polmjax.data import DataConfig
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.optim import OptimConfig
from polmjax.train.rm import RMExperiment


def config() -> RMExperiment:
    return RMExperiment(
        model=ModelSource(path="runs/sft_tiny/export/hf", num_labels=1),
        data=DataConfig(path="toy:preference", packing="best_fit", eval_fraction=0.05),
        train=TrainConfig(run_dir="runs/rm_tiny", steps=600, global_batch=32, seq_len=128, log_every=25,
                          eval_every=100, eval_batches=4, save_every=200, keep=2),
        optim=OptimConfig(name="adamw", lr=1e-3, schedule="cosine", warmup_steps=10, weight_decay=0.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
    )
