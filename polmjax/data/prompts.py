"""Prompts for RL: rows of a `prompt` dataset, tokenised, shuffled per epoch, drawn in batches; exact resume.

    source = PromptSource(DataConfig(path="gsm8k.jsonl"), tokenizer, max_prompt_len=256, batch_size=16)
    it = iter(source); prompts = next(it); more = it.take(16); state = it.get_state(); it.set_state(state)

A row is `prompt` (a string, or a list of messages rendered with the chat template and its generation
prompt) plus any other fields, which travel with the prompt to the reward functions (`answer`,
reasoning-gym's `entry`, ...). The "train" split is reshuffled every epoch (deterministic in
`cfg.seed`) and repeated per `cfg.num_epochs`; the "eval" split (`cfg.eval_fraction` of the rows,
`split_indices`) is read once, in order. Prompts longer than `max_prompt_len` tokens are skipped and
counted (as verl's `filter_overlong_prompts`), never cut: a cut prompt asks a different question.

The iterator's state is (epoch, position in the epoch's order, skipped count): a small JSON dict.
`take(n)` may be called any number of times per training step (dynamic sampling draws more prompts
until its batch is full), and the state after it resumes exactly there. One process reads the whole
stream: multi-host RL is not supported yet.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from polmjax.data.formats import DataError, is_conversational
from polmjax.data.pipeline import DataConfig, split_indices
from polmjax.data.sources import load_records
from polmjax.data.tokenize import _encode, _prepend_bos, _render

log = logging.getLogger("polmjax.data")


@dataclasses.dataclass
class Prompt:
    """One prompt: its token ids, the row's `prompt` as given (string or messages), its other fields,
    and where it came from ("file row N")."""

    ids: np.ndarray
    prompt: Any
    fields: dict[str, Any]
    where: str


def tokenize_prompt(prompt: Any, tokenizer) -> np.ndarray:
    """Token ids the model continues: a conversation rendered with the chat template and its generation
    prompt (exactly the template's tokens, as the preference pipelines tokenise prompts), or a string
    with BOS prepended when the tokenizer has one."""
    if is_conversational(prompt):
        ids = _encode(tokenizer, _render(tokenizer, prompt, add_generation_prompt=True))
    else:
        ids, _ = _prepend_bos(tokenizer, _encode(tokenizer, prompt), None)
    return np.asarray(ids, np.int32)


class PromptSource:
    """The prompts of one split; `iter()` gives a resumable `PromptIterator`."""

    def __init__(self, cfg: DataConfig, tokenizer, *, max_prompt_len: int, batch_size: int = 1, split: str = "train"):
        if split not in ("train", "eval"):
            raise ValueError(f"PromptSource: split={split!r}; expected 'train' or 'eval'")
        if cfg.format not in ("auto", "prompt"):
            raise DataError(f"data.format={cfg.format!r}: RL prompts are the 'prompt' format (a 'prompt' field "
                            f"plus any fields the rewards read); use format 'auto' or 'prompt'")
        self.cfg, self.tokenizer, self.max_prompt_len, self.split = cfg, tokenizer, max_prompt_len, split
        self.batch_size = batch_size
        self.records = load_records(cfg.path, split=cfg.split, format="prompt", skip_bad_rows=cfg.skip_bad_rows,
                                    max_rows=cfg.max_rows)
        train, held_out = split_indices(len(self.records), cfg.eval_fraction, cfg.seed)
        self.indices = train if split == "train" else held_out
        if not len(self.indices):
            raise DataError(f"{self.records.source}: no {split} prompts (eval_fraction={cfg.eval_fraction})")

    def __iter__(self) -> PromptIterator:
        return PromptIterator(self)

    def prompt(self, i: int) -> Prompt | None:
        """Record i as a Prompt, or None when it is longer than max_prompt_len tokens."""
        row = self.records.rows[i]
        ids = tokenize_prompt(row["prompt"], self.tokenizer)
        if len(ids) > self.max_prompt_len:
            return None
        return Prompt(ids, row["prompt"], {k: v for k, v in row.items() if k != "prompt"}, self.records.where(i))

    def order(self, epoch: int) -> np.ndarray:
        """The record indices of one epoch: shuffled by (seed, epoch) for "train", in order for "eval"."""
        if self.split == "eval":
            return self.indices
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(self.indices)


class PromptIterator:
    """Draws prompts in the source's order: `next()` is a list of `batch_size` prompts, `take(n)` of n."""

    def __init__(self, source: PromptSource):
        self.source = source
        self.epoch, self.position, self.skipped = 0, 0, 0
        self._order = source.order(0)

    def __iter__(self) -> PromptIterator:
        return self

    def __next__(self) -> list[Prompt]:
        batch = self.take(self.source.batch_size)
        if not batch:
            raise StopIteration
        return batch

    def _next_prompt(self) -> Prompt:
        src = self.source
        scanned = 0
        while True:
            if self.position == len(self._order):
                if src.split == "eval" or (src.cfg.num_epochs is not None and self.epoch + 1 >= src.cfg.num_epochs):
                    raise StopIteration
                self.epoch, self.position = self.epoch + 1, 0
                self._order = src.order(self.epoch)
            i = int(self._order[self.position])
            self.position += 1
            prompt = src.prompt(i)
            if prompt is not None:
                return prompt
            self.skipped += 1
            scanned += 1
            if self.skipped == 1:
                log.warning("%s: prompt longer than max_prompt_len=%d tokens: skipped (further skips are counted "
                            "in the metrics as prompts/skipped)", src.records.where(i), src.max_prompt_len)
            if scanned >= len(self._order):
                raise DataError(f"{src.records.source}: every prompt is longer than max_prompt_len="
                                f"{src.max_prompt_len} tokens (train.seq_len - max_completion_len)")

    def take(self, n: int) -> list[Prompt]:
        """The next n prompts (fewer only at the end of the eval split or of the last epoch)."""
        out = []
        for _ in range(n):
            try:
                out.append(self._next_prompt())
            except StopIteration:
                break
        return out

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "skipped": self.skipped}

    def set_state(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.skipped = int(state["epoch"]), int(state["position"]), int(state["skipped"])
        self._order = self.source.order(self.epoch)
