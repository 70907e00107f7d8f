"""Optimizers from optax with warm-up + decay schedules, global-norm clipping and a weight-decay mask."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import optax

from polmjax.models.decoder import flatten, unflatten


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | lion | adafactor
    lr: float = 1e-4
    schedule: str = "cosine"  # cosine | linear | constant (after linear warm-up)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio (cosine, linear)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decay_embeddings: bool = False  # norms and biases are never decayed
    clip_norm: float | None = 1.0
    # Steps the warm-up + decay schedule spans; 0 = train.steps. Extending a run (train.steps raised on
    # a run directory) pins it to the original horizon, see polmjax.train.rundir.
    schedule_steps: int = 0

    def horizon(self, train_steps: int) -> int:
        """The steps the learning-rate schedule spans for a run of `train_steps` steps."""
        return self.schedule_steps or train_steps

    def validate(self):
        if self.name not in ("adamw", "lion", "adafactor"):
            raise ValueError(f"optim.name={self.name!r}; expected adamw, lion or adafactor")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.schedule={self.schedule!r}; expected cosine, linear or constant")
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr}: must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps}: must be >= 0")
        if self.schedule_steps < 0:
            raise ValueError(f"optim.schedule_steps={self.schedule_steps}: must be >= 0 (0: train.steps)")


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, learning-rate schedule). Clipping comes first, on the global gradient norm."""
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                          mask=lambda p: decay_mask(p, cfg.decay_embeddings))
    elif cfg.name == "lion":
        opt = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                         mask=lambda p: decay_mask(p, cfg.decay_embeddings))
    else:
        opt = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None,
                              weight_decay_mask=lambda p: decay_mask(p, cfg.decay_embeddings))
    if cfg.clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt, schedule


def decay_mask(params: dict, decay_embeddings: bool = False) -> dict:
    """True for parameters that get weight decay: matrices, not norms or biases (embeddings optional)."""

    def decays(name: str) -> bool:
        leaf = name.rsplit("/", 1)[-1]
        if "norm" in leaf or leaf.endswith("bias"):
            return False
        if leaf == "embed":
            return decay_embeddings
        return True

    return unflatten({name: decays(name) for name in flatten(jax.tree.map(lambda x: 0, params))})
