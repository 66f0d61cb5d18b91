"""LoRA adapters: which projections they target, their initialisation and their state's layout.

The adapter state of a model (llama.py's `Adapter` variables, split off the base) is the pure dict
`{"layers": {block: {projection: {"lora_a": [L, in, r], "lora_b": [L, r, out]}}}}`, block "self_attn" or
"mlp", for each target projection. The delta of a projection is `dropout(x) @ lora_a @ lora_b * scale`,
scale = alpha / r (alpha / sqrt(r) with rsLoRA), as in PEFT. `lora_a` is initialised as PEFT does
(kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) and `lora_b` = 0, so a fresh adapter
leaves the base model unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

Adapters = dict[str, dict[str, Any]]

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


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


def block_of(name: str) -> str:
  """The module of a decoder layer that holds a projection: "self_attn" or "mlp"."""
  return "self_attn" if name in ATTENTION_PROJECTIONS else "mlp"


def init_adapters(model_cfg, lcfg: LoraConfig, rng: jax.Array, dtype=jnp.float32) -> Adapters:
  """Fresh adapter state for every layer: lora_a ~ U(-1/sqrt(in), 1/sqrt(in)) as PEFT, lora_b = 0."""
  shapes = projection_shapes(model_cfg)
  L, r = model_cfg.num_layers, lcfg.rank
  layers = {}
  for key, name in zip(jax.random.split(rng, len(lcfg.targets)), lcfg.targets):
    fan_in, fan_out = shapes[name]
    bound = 1.0 / math.sqrt(fan_in)
    layers.setdefault(block_of(name), {})[name] = {
        "lora_a": jax.random.uniform(key, (L, fan_in, r), dtype, -bound, bound),
        "lora_b": jnp.zeros((L, r, fan_out), dtype),
    }
  return {"layers": layers}


def projection_adapters(adapters: Adapters) -> dict[str, dict[str, Any]]:
  """{projection: {"lora_a", "lora_b"}} of an adapter state (any leading axes kept)."""
  return {name: ab for block in adapters["layers"].values() for name, ab in block.items()}


def count_parameters(adapters) -> int:
  return sum(x.size for x in jax.tree.leaves(adapters))
