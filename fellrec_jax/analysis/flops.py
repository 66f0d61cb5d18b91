"""Model FLOPs and sizes of LoRA fine-tuning on a frozen Llama, per example, whole or per split part.

What is counted (docs/performance.md): multiply-adds of the matmuls only, 2 FLOPs each; norms, rotary,
softmax, activations and the optimizer are not counted. An example of n tokens is the plain computation
(one unpadded sequence, no shared prefix): its logits are computed at all n positions. Attention is
4*n^2*(heads*head_dim) per layer forward (QK^T and PV over every query/key pair: causal masking is *not*
halved). Training = forward + backward, where the backward computes activation gradients only for the
frozen weights (as much as their forward) and, for LoRA, activation and weight gradients (twice its
forward); attention's backward is twice its forward (dQ, dK, dV, dP).
"""

from __future__ import annotations

from typing import NamedTuple

from fellrec_jax.model import lora as lora_lib
from fellrec_jax.model import split as split_lib


class LayerFlops(NamedTuple):
  """Forward FLOPs of one decoder layer over a sequence of n tokens."""

  frozen: int  # the seven base projections
  attention: int  # scores and weighted values
  lora: int  # the adapters' two matmuls per target

  def training(self) -> int:
    return 2 * self.frozen + 3 * self.attention + 3 * self.lora

  def forward(self) -> int:
    return self.frozen + self.attention + self.lora


def layer_flops(cfg, lcfg: lora_lib.LoraConfig | None, n: int) -> LayerFlops:
  shapes = lora_lib.projection_shapes(cfg)
  frozen = sum(2 * n * i * o for i, o in shapes.values())
  attention = 4 * n * n * cfg.num_heads * cfg.head_dim
  targets = () if lcfg is None else lcfg.targets
  lora = sum(2 * n * (shapes[t][0] * lcfg.rank + lcfg.rank * shapes[t][1]) for t in targets)
  return LayerFlops(frozen, attention, lora)


def head_flops(cfg, n: int) -> int:
  """Forward FLOPs of the LM head at n positions."""
  return 2 * n * cfg.hidden_size * cfg.vocab_size


def training_flops(cfg, lcfg, n: int, layers: int | None = None, head: bool = True) -> int:
  """Forward + backward FLOPs of `layers` decoder layers (default all) and the head, for n tokens."""
  layers = cfg.num_layers if layers is None else layers
  head_part = 2 * head_flops(cfg, n) if head else 0
  return layers * layer_flops(cfg, lcfg, n).training() + head_part


def forward_flops(cfg, lcfg, n: int, layers: int | None = None, head: bool = True) -> int:
  layers = cfg.num_layers if layers is None else layers
  return layers * layer_flops(cfg, lcfg, n).forward() + (head_flops(cfg, n) if head else 0)


def client_training_flops(cfg, lcfg, n: int, k: int) -> int:
  """A client's share of one example's training FLOPs: its layers and the head."""
  return training_flops(cfg, lcfg, n, layers=split_lib.num_client_layers(cfg, k), head=True)


def base_parameter_counts(cfg) -> dict[str, int]:
  """Frozen parameters by part: embeddings, one decoder layer, final norm, head (0 when tied)."""
  shapes = lora_lib.projection_shapes(cfg)
  layer = sum(i * o for i, o in shapes.values()) + 2 * cfg.hidden_size
  if cfg.attention_bias:
    layer += sum(o for name, (_, o) in shapes.items() if name in ("q_proj", "k_proj", "v_proj", "o_proj"))
  if cfg.mlp_bias:
    layer += sum(o for name, (_, o) in shapes.items() if name in ("gate_proj", "up_proj", "down_proj"))
  embed = cfg.vocab_size * cfg.hidden_size
  return {"embed": embed, "layer": layer, "norm": cfg.hidden_size,
          "head": 0 if cfg.tie_word_embeddings else embed}


def lora_parameters_per_layer(cfg, lcfg: lora_lib.LoraConfig) -> int:
  shapes = lora_lib.projection_shapes(cfg)
  return sum(lcfg.rank * (shapes[t][0] + shapes[t][1]) for t in lcfg.targets)


def client_parameters(cfg, lcfg, k: int) -> dict[str, int]:
  """Parameters a client holds with split point k (base: embeddings, its layers, norm, head; LoRA)."""
  counts = base_parameter_counts(cfg)
  layers = split_lib.num_client_layers(cfg, k)
  base = counts["embed"] + layers * counts["layer"] + counts["norm"] + counts["head"]
  return {"base": base, "lora": layers * lora_parameters_per_layer(cfg, lcfg)}


def total_parameters(cfg) -> int:
  counts = base_parameter_counts(cfg)
  return counts["embed"] + cfg.num_layers * counts["layer"] + counts["norm"] + counts["head"]


def packed_training_flops(cfg, lcfg, rows: int, row_len: int, prefix_len: int) -> int:
  """FLOPs one packed step executes: every slot of rows x row_len and the prefix once (padding included).

  Rows attend to the prefix and to their whole row (4 * slots * (P + T) * heads*head_dim per layer);
  the head runs at every row slot and at the prefix's positions.
  """
  slots = rows * row_len
  tokens = slots + prefix_len
  per_token = layer_flops(cfg, lcfg, 1)
  attention = 4 * (slots * (prefix_len + row_len) + prefix_len * prefix_len) * cfg.num_heads * cfg.head_dim
  layers = cfg.num_layers * (tokens * (2 * per_token.frozen + 3 * per_token.lora) + 3 * attention)
  return layers + 2 * head_flops(cfg, tokens)


def streamed_training_flops(cfg, lcfg, tokens: int, rows: int, row_len: int, prefix_len: int, clients: int,
                            causal_blocks: int = 1) -> int:
  """FLOPs one streamed step (stream.py) executes: `tokens` row tokens (the budget) and each client's prefix
  through the token-wise ops and the head; attention over `rows` rows of `row_len` (in `causal_blocks`
  query blocks, block j seeing the prefix and the first (j+1)/blocks of its row) and each client's prefix
  (causal, not halved). LoRA is counted per token as in `layer_flops` (the stream's masked all-clients
  form does `clients` times more, not counted: these are model FLOPs of the executed layout)."""
  stream = tokens + clients * prefix_len
  per_token = layer_flops(cfg, lcfg, 1)
  size = row_len // causal_blocks
  row_keys = sum(size * (prefix_len + (j + 1) * size) for j in range(causal_blocks))
  attention = 4 * (rows * row_keys + clients * prefix_len * prefix_len) * cfg.num_heads * cfg.head_dim
  layers = cfg.num_layers * (stream * (2 * per_token.frozen + 3 * per_token.lora) + 3 * attention)
  return layers + 2 * head_flops(cfg, stream)
