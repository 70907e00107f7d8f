"""Rotary position embeddings, with the frequency schedules of `transformers` (default, linear, llama3, yarn)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from polmjax.models.config import RopeConfig, yarn_attention_factor


def inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies [head_dim / 2], float32, as `transformers.modeling_rope_utils` computes them."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    base = (np.float32(1.0) / (np.float32(rope.theta) ** exponent)).astype(np.float32)
    if rope.type == "default":
        return base
    if rope.type == "linear":
        return (base / np.float32(rope.factor)).astype(np.float32)
    if rope.type == "llama3":
        return _llama3(base, rope)
    if rope.type == "yarn":
        return _yarn(rope, head_dim)
    raise ValueError(f"rope type {rope.type!r}")


def attention_factor(rope: RopeConfig) -> float:
    """Scale applied to cos and sin (1 except for yarn)."""
    return yarn_attention_factor(rope) if rope.type == "yarn" else 1.0


def cos_sin(positions_BT: jax.Array, rope: RopeConfig, head_dim: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, head_dim] in float32 for integer positions."""
    freqs_BTk = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(rope, head_dim))[None, None]
    emb_BTK = jnp.concatenate([freqs_BTk, freqs_BTk], axis=-1)
    factor = attention_factor(rope)
    cos, sin = jnp.cos(emb_BTK), jnp.sin(emb_BTK)
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    return cos, sin


def apply_rope(x_BTHK: jax.Array, cos_BTK: jax.Array, sin_BTK: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin, in x's dtype (cos/sin are cast to it first, as in transformers)."""
    cos = cos_BTK.astype(x_BTHK.dtype)[:, :, None, :]
    sin = sin_BTK.astype(x_BTHK.dtype)[:, :, None, :]
    half = x_BTHK.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTHK[..., half:], x_BTHK[..., :half]], axis=-1)
    return x_BTHK * cos + rotated * sin


def _llama3(base: np.ndarray, r: RopeConfig) -> np.ndarray:
    old = r.original_max_position_embeddings
    low_wavelen = old / r.low_freq_factor
    high_wavelen = old / r.high_freq_factor
    wavelen = (2 * math.pi / base).astype(np.float32)
    scaled = np.where(wavelen > low_wavelen, base / np.float32(r.factor), base).astype(np.float32)
    smooth = ((old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(r.factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(r: RopeConfig, dim: int) -> np.ndarray:
    def correction_dim(rotations):
        return (dim * math.log(r.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(r.theta)
        )

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = (np.float32(r.theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))).astype(
        np.float32
    )
    extrapolation = (np.float32(1.0) / pos_freqs).astype(np.float32)
    interpolation = (np.float32(1.0) / (np.float32(r.factor) * pos_freqs)).astype(np.float32)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extra_factor = (1 - ramp).astype(np.float32)
    return (interpolation * (1 - extra_factor) + extrapolation * extra_factor).astype(np.float32)
