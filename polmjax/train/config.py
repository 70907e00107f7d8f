"""Typed configs shared by every algorithm's experiment files."""

from __future__ import annotations

from dataclasses import dataclass, field

from polmjax.models.config import ModelConfig


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: an HF directory (`path`) or a fresh random init (`init`)."""

    path: str = ""
    init: ModelConfig | None = None  # used when path is empty; vocab_size=0 takes the tokenizer's size
    tokenizer: str = ""  # HF tokenizer directory (default: path); "toy" builds the offline toy tokenizer
    dtype: str = "float32"  # parameter (master weight) dtype
    compute_dtype: str = "float32"
    remat: str = "none"
    scan_layers: bool = False
    attention_impl: str = "auto"
    logprob_impl: str = "auto"
    # 0: a causal LM. >= 1: a sequence classifier / reward model (HF `*ForSequenceClassification`): a
    # checkpoint with that head loads it, a causal LM gets a new head (polmjax.models.from_pretrained)
    num_labels: int = 0

    def validate(self):
        if bool(self.path) == (self.init is not None):
            raise ValueError("model: set exactly one of model.path (HF directory) and model.init (random init)")
        if not (self.tokenizer or self.path):
            raise ValueError("model.tokenizer: needed when model.init is used (an HF directory or 'toy')")

    @property
    def execution(self) -> dict:
        return dict(remat=self.remat, scan_layers=self.scan_layers, attention_impl=self.attention_impl,
                    logprob_impl=self.logprob_impl)


@dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: the remaining devices
    tensor: int = 1


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/run"
    steps: int = 100
    global_batch: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: never (needs data.eval_fraction > 0)
    eval_batches: int = 4
    save_every: int = 100
    keep: int = 3
    async_save: bool = True
    export_hf: bool = True  # write the final model to run_dir/export/hf (and the LoRA adapter to export/adapter)
    tensorboard: bool = True
    wandb_project: str | None = None
    sample_prompts: tuple[str, ...] = field(default_factory=tuple)  # generations printed at the end
    max_new_tokens: int = 32

    def validate(self):
        if self.grad_accum >= 1 and self.global_batch % self.grad_accum:
            raise ValueError(f"train.global_batch={self.global_batch} is not divisible by "
                             f"train.grad_accum={self.grad_accum}")
        for name in ("steps", "global_batch", "seq_len", "grad_accum", "log_every", "save_every", "keep",
                     "eval_batches", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)}: must be >= 1")
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every={self.eval_every}: must be >= 0 (0: never)")
