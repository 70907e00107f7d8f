"""DAPO of Qwen2.5-1.5B-Instruct on MATH (the 7,500 competition problems of Hendrycks et al.), for a TPU pod slice.

DAPO (Yu et al. 2025, arXiv:2503.14476), its four techniques at this model's scale: clip-higher
(ε_low 0.2, ε_high 0.28), token-level loss (`token_mean` over each mini-batch), dynamic sampling (groups
whose 16 completions all score the same are dropped and more prompts drawn, up to 3 rounds) and overlong
reward shaping (no loss on truncated completions, and the soft punishment over the last 512 of the 2048
completion tokens as a second reward); no KL term, lr 1e-6 with weight decay 0.1. Each step samples 16
completions of 16 problems (256 completions) and takes 4 updates on mini-batches of 64 of them (the
paper: 512 prompts, mini-batches of 32 prompts). `math_reward` compares the completion's `\\boxed{}`
answer with the `\\boxed{}` of the MATH solution (math-verify: symbolic and numeric equivalence). bf16
compute with fp32 master weights, FSDP over every chip, scan over layers with remat.

The prompt asks for the answer in `\\boxed{}` (Qwen2.5-Math's instruction); the prepared rows keep the
whole `solution`, which math_reward reads when there is no `answer` column. To start from the base model
(DAPO starts from a base model), `--set model.path=Qwen/Qwen2.5-1.5B`.

    # the prompts (from the hub when online, or a local copy with problem / solution columns):
    python experiments/grpo/prepare_math.py --out data/math/train.jsonl
    python experiments/grpo/prepare_math.py --source /data/MATH-lighteval/train.parquet --out data/math/train.jsonl
    # on the slice (one host: polmjax grpo runs in one process for now):
    polmjax grpo experiments/grpo/qwen2p5_1p5b_math_dapo.py --set train.run_dir=/mnt/shared/runs/qwen2p5-1p5b-dapo
    # will it fit (config.json only, no weights): the update, the sampler and the old policy's forward
    python tpu/aot_compile.py experiments/grpo/qwen2p5_1p5b_math_dapo.py --target v5p:2x2x1 --set model.path=DIR

Memory fit, compiled ahead of time from a CPU host (`tpu/aot_compile.py`; a directory holding only the
model's config.json is enough), GiB per chip. The update (one mini-batch of 64 rows) holds the state (fp32
params + Adam); the sampler (16 prompts of 512 tokens, 16 x 2048 new tokens: a 256 x 2560-slot bf16 KV
cache, 2 kv heads) and the old policy's forward over the whole rollout (256 x 2560) run while it stays
resident; peak = the largest:

    target     grad_accum  update: args + temp = total  sampler (decode temp)  old-policy fwd  peak / HBM  compile
    v5p:2x2x1   2          4.32 + 36.41 = 40.73         10.59 (6.22)           10.59           40.7 / 95   175 + 85 s
    v5e:2x4     8          2.16 +  7.39 =  9.55          6.54 (4.35)            9.94            9.9 / 16   334 + 127 s

(v5e: `--set train.grad_accum=8`; there the old-policy forward, one program over all 256 rows, is the peak.
Compile times: update + rollout programs, on a loaded 2-core host.)
"""

from polmjax.data import DataConfig
from polmjax.train.config import MeshConfig, ModelSource, TrainConfig
from polmjax.train.grpo import GRPOExperiment, Reward
from polmjax.train.optim import OptimConfig

MAX_COMPLETION_LEN = 2048


def config() -> GRPOExperiment:
    return GRPOExperiment(
        model=ModelSource(path="Qwen/Qwen2.5-1.5B-Instruct", dtype="float32", compute_dtype="bfloat16",
                          remat="dots_no_batch", scan_layers=True),
        data=DataConfig(path="data/math/train.jsonl", format="prompt", eval_fraction=0.02),
        # 16 prompts x 16 completions; a row holds a prompt (<= 512 tokens) and its completion (<= 2048)
        train=TrainConfig(run_dir="runs/qwen2p5_1p5b_math_dapo", steps=300, global_batch=256, seq_len=2560,
                          grad_accum=2, log_every=1, eval_every=50, eval_batches=8, save_every=25, keep=3),
        optim=OptimConfig(name="adamw", lr=1e-6, schedule="constant", warmup_steps=10, weight_decay=0.1,
                          clip_norm=1.0),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        rewards=(Reward("polmjax.rl.rewards:math_reward"),
                 Reward("polmjax.rl.rewards:overlong_reward", isolate=False,
                        kwargs={"max_len": MAX_COMPLETION_LEN, "buffer": 512})),
        num_generations=16,
        max_completion_len=MAX_COMPLETION_LEN,
        temperature=1.0,
        loss="clipped",
        epsilon_low=0.2,
        epsilon_high=0.28,
        aggregation="token_mean",
        beta=0.0,
        mini_batches=4,
        dynamic_sampling=True,
        max_sampling_rounds=3,
        mask_truncated=True,
        eval_samples=4,
        verifier_workers=8,
    )
