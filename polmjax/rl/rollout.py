"""Sample completions of prompts from a model and score them: what a GRPO step, its held-out evaluation and
the quickstart's preference mining share.

    sampler = PolicySampler(cfg, tokenizer, mesh, [RewardFn(exact_match_reward, isolate=False)], max_new_tokens=16)
    samples = sampler.generate(params, prompts, key, n=8)          # host arrays, row b * n + i
    scores = sampler.score(prompts, samples, n=8)                  # polmjax.rl.rewards.Scores
    metrics = sampler.evaluate(params, prompts, k=4, key=key)      # greedy accuracy, pass@k, ...

A completion is *correct* when the first reward function gives it >= 1 (e.g. an exact or verified
answer). Prompts are `polmjax.data.prompts.Prompt`s; the reward functions see the prompt as given (a
string or messages), the decoded completion and the row's other fields plus `completion_lengths`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from polmjax.data.prompts import Prompt
from polmjax.data.tokenize import stop_token_ids
from polmjax.rl import rewards as rewards_lib
from polmjax.rl import sampler as sampler_lib


class PolicySampler:
    """The sampling settings and the reward functions of one run; holds the verifier pool (`close()` it)."""

    def __init__(self, cfg, tokenizer, mesh, reward_fns: Sequence[rewards_lib.RewardFn], *, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, stop_sequences: Sequence[str] = (), ignore_eos: bool = False,
                 cache_dtype: str = "", verifier_workers: int = 2, verifier_timeout_s: float = 10.0):
        if not reward_fns:
            raise ValueError("PolicySampler: needs at least one reward function (the first defines correctness)")
        self.cfg, self.tokenizer, self.mesh, self.reward_fns = cfg, tokenizer, mesh, list(reward_fns)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.truncation = dict(top_k=top_k, top_p=top_p, min_p=min_p)
        eos = stop_token_ids(tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        self.eos = () if ignore_eos else eos
        self.stops = tuple(tuple(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stop_sequences)
        self.cache_dtype = jnp.dtype(cache_dtype) if cache_dtype else None
        isolated = [r for r in self.reward_fns if r.isolate]
        # each worker imports the verifiers' modules before its first call (reasoning_gym takes seconds)
        preload = tuple(sorted({_module(r.fn) for r in isolated} - {"__main__"}))
        self.pool = (rewards_lib.VerifierPool(verifier_workers, timeout_s=verifier_timeout_s, preload=preload)
                     if isolated else None)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def generate(self, params, prompts: Sequence[Prompt], key, *, n: int, temperature: float | None = None):
        """`n` completions of each prompt (`polmjax.rl.sampler.Samples` as host numpy arrays); temperature
        0 is greedy (then top-k/p and min-p do not apply)."""
        temperature = self.temperature if temperature is None else temperature
        ids, mask = sampler_lib.pad_prompts([p.ids.tolist() for p in prompts], self.pad)
        truncation = self.truncation if temperature else {}
        out = sampler_lib.sample(self.cfg, params, ids, mask, key, n=n, max_new_tokens=self.max_new_tokens,
                                 eos_ids=self.eos, stop_sequences=self.stops, temperature=temperature,
                                 pad_id=self.pad, mesh=self.mesh, cache_dtype=self.cache_dtype, **truncation)
        return jax.device_get(out)

    def texts(self, samples) -> list[str]:
        """The decoded completions (special tokens dropped)."""
        return [self.tokenizer.decode(t[m], skip_special_tokens=True) for t, m in zip(samples.tokens, samples.mask)]

    def score(self, prompts: Sequence[Prompt], samples, *, n: int) -> rewards_lib.Scores:
        per_row = [p for p in prompts for _ in range(n)]
        fields: dict[str, list] = {k: [p.fields.get(k) for p in per_row] for k in per_row[0].fields}
        fields["completion_lengths"] = [int(x) for x in samples.lengths]
        return rewards_lib.score(self.reward_fns, [p.prompt for p in per_row], self.texts(samples), fields,
                                 pool=self.pool)

    def correct(self, scores: rewards_lib.Scores) -> np.ndarray:
        """[B] bool: the first reward function's value is >= 1."""
        return np.nan_to_num(scores.per_fn[self.reward_fns[0].label], nan=0.0) >= 1.0

    def evaluate(self, params, prompts: Sequence[Prompt], *, k: int, key, batch: int = 64, group_by: str = "") -> dict:
        """Greedy `accuracy` and `reward`; `pass@k` and `accuracy_sampled` (pass@1) from k samples per prompt
        at the sampling temperature; `completion_length` (greedy); over `prompts`, `batch` at a time. With
        `group_by` (a prompt field, e.g. a task name) also `accuracy/<value>` and `pass@k/<value>` per value."""
        greedy_correct, greedy_reward, lengths, any_correct, mean_correct = [], [], [], [], []
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            greedy = self.generate(params, chunk, None, n=1, temperature=0.0)
            scores = self.score(chunk, greedy, n=1)
            greedy_correct.append(self.correct(scores))
            greedy_reward.append(scores.total)
            lengths.append(greedy.lengths)
            draws = self.generate(params, chunk, jax.random.fold_in(key, start), n=k)
            correct = self.correct(self.score(chunk, draws, n=k)).reshape(len(chunk), k)
            any_correct.append(correct.any(axis=1))
            mean_correct.append(correct.mean(axis=1))
        if not prompts:
            return {}
        cat = lambda xs: float(np.concatenate(xs).mean())  # noqa: E731
        out = {"accuracy": cat(greedy_correct), f"pass@{k}": cat(any_correct), "accuracy_sampled": cat(mean_correct),
               "reward": cat(greedy_reward), "completion_length": cat(lengths), "prompts": float(len(prompts))}
        if group_by:
            out.update(per_group(prompts, group_by, k, np.concatenate(greedy_correct), np.concatenate(any_correct)))
        return out


def per_group(prompts: Sequence[Prompt], field: str, k: int, correct: np.ndarray, any_correct: np.ndarray) -> dict:
    """`accuracy/<value>` and `pass@k/<value>` for each value of the prompts' `field` ([P] bool arrays in)."""
    labels = np.array([str(p.fields.get(field)) for p in prompts])
    out = {}
    for value in sorted(set(labels)):
        out[f"accuracy/{value}"] = float(correct[labels == value].mean())
        out[f"pass@{k}/{value}"] = float(any_correct[labels == value].mean())
    return out


def _module(fn) -> str:
    while hasattr(fn, "func"):  # functools.partial
        fn = fn.func
    return getattr(fn, "__module__", None) or type(fn).__module__
