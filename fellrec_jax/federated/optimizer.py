"""The local optimizer of a client: AdamW with the Hugging Face Trainer's defaults and linear schedule.

The reference trains every client with a fresh `transformers.Trainer` each round: AdamW (betas 0.9/0.999,
eps 1e-8, no weight decay), gradient clipping at global norm 1.0, and a linear schedule that warms up for
`warmup_steps` optimizer steps (round 0 only) and decays linearly to 0 over the client's steps of the round.
The schedule depends on each client's own number of steps, so it is a function of traced arrays rather
than an optax schedule with a static horizon.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 1e-4
  warmup_steps: int = 20  # optimizer steps of linear warm-up, in round 0 only (reference: 20)
  schedule: str = "linear"  # "linear" (warm-up then linear decay to 0 within each round) or "constant"
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  max_grad_norm: float = 1.0  # 0 disables clipping
  fresh_each_round: bool = True  # a new optimizer state each round (the reference) or one kept across rounds

  def __post_init__(self):
    if self.schedule not in ("linear", "constant"):
      raise ValueError(f"optimizer schedule must be 'linear' or 'constant', got {self.schedule!r}")
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


def transform(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """Clipping, Adam moments and decoupled weight decay; the caller scales by -learning_rate."""
  parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm > 0 else []
  parts += [optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)]
  if cfg.weight_decay:
    parts.append(optax.add_decayed_weights(cfg.weight_decay))
  return optax.chain(*parts)


def learning_rate(cfg: OptimizerConfig, step, total_steps, warmup_steps):
  """transformers' get_linear_schedule_with_warmup at optimizer step `step` (0-based; arrays allowed)."""
  step = jnp.asarray(step, jnp.float32)
  if cfg.schedule == "constant":
    return jnp.full_like(step, cfg.learning_rate)
  total = jnp.asarray(total_steps, jnp.float32)
  warmup = jnp.asarray(warmup_steps, jnp.float32)
  warming = step / jnp.maximum(1.0, warmup)
  decaying = jnp.maximum(0.0, (total - step) / jnp.maximum(1.0, total - warmup))
  return cfg.learning_rate * jnp.where(step < warmup, warming, decaying)
