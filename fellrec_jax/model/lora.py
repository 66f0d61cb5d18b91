"""LoRA adapters: a pytree separate from the frozen base, stacked on the layer axis.

Adapters are `{projection: {"a": [L, in, r], "b": [L, r, out]}}` for each target projection. The delta
of a projection is `dropout(x) @ a @ b * scale`, scale = alpha / r (alpha / sqrt(r) with rsLoRA), as in
PEFT. `a` is initialised as PEFT does (kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)))
and `b` = 0, so a fresh adapter leaves the base model unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

Adapters = dict[str, dict[str, Any]]

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyper-parameters (reference: r=8, alpha=16, dropout=0.05 on q_proj and v_proj)."""

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.05
  targets: tuple[str, ...] = ("q_proj", "v_proj")
  use_rslora: bool = False

  def __post_init__(self):
    unknown = [t for t in self.targets if t not in ALL_TARGETS]
    if unknown:
      raise ValueError(f"unknown LoRA target(s) {unknown}; choose from {ALL_TARGETS}")
    if not self.targets:
      raise ValueError("LoRA needs at least one target projection")
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def projection_shapes(model_cfg) -> dict[str, tuple[int, int]]:
  """(in, out) of every projection of a decoder layer."""
  d, f = model_cfg.hidden_size, model_cfg.intermediate_size
  q, kv = model_cfg.num_heads * model_cfg.head_dim, model_cfg.num_kv_heads * model_cfg.head_dim
  return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
          "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def init_adapters(model_cfg, lcfg: LoraConfig, rng: jax.Array, dtype=jnp.float32) -> Adapters:
  """Fresh adapters for every layer: a ~ U(-1/sqrt(in), 1/sqrt(in)) as PEFT, b = 0."""
  shapes = projection_shapes(model_cfg)
  L, r = model_cfg.num_layers, lcfg.rank
  adapters = {}
  for key, name in zip(jax.random.split(rng, len(lcfg.targets)), lcfg.targets):
    fan_in, fan_out = shapes[name]
    bound = 1.0 / math.sqrt(fan_in)
    adapters[name] = {
        "a": jax.random.uniform(key, (L, fan_in, r), dtype, -bound, bound),
        "b": jnp.zeros((L, r, fan_out), dtype),
    }
  return adapters


def lora_delta(x, adapter, lcfg: LoraConfig, rng, dtype):
  """dropout(x) @ a @ b * scale, in the compute dtype."""
  if rng is not None and lcfg.dropout > 0.0:
    keep = jax.random.bernoulli(rng, 1.0 - lcfg.dropout, x.shape)
    x = jnp.where(keep, x / (1.0 - lcfg.dropout), 0).astype(x.dtype)
  return ((x @ adapter["a"].astype(dtype)) @ adapter["b"].astype(dtype)) * jnp.asarray(lcfg.scale, dtype)


def count_parameters(adapters) -> int:
  return sum(x.size for x in jax.tree.leaves(adapters))
