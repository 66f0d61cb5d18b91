"""One client step through the split, with the client/server boundary executed explicitly (docs/method.md §3).

The client runs `front` and sends h_k; the server runs `middle` and returns h_{L-1}; the client runs
`back` and the loss (labels never leave it), sends dL/dh_{L-1}; the server back-propagates through its
layers and returns dL/dh_k; the client finishes its backward pass. Each crossing is a concrete array, so
its bytes are what a real deployment would send (padding included).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fellrec_jax.model import lora as lora_lib
from fellrec_jax.model import loss as loss_lib
from fellrec_jax.model import llama as model_lib
from fellrec_jax.model import split as split_lib
from fellrec_jax.privacy import defences as defences_lib


@dataclasses.dataclass(frozen=True)
class SplitConfig:
  """Static settings of the split forward/backward."""

  model: model_lib.LlamaConfig
  lora: lora_lib.LoraConfig
  split_k: int
  loss_chunk: int = 0  # positions per chunk of the LM head + cross-entropy (0: all at once)
  remat: bool = False  # recompute each layer's activations in the backward pass (saves memory)
  defences: defences_lib.Defences = defences_lib.Defences()  # boundary noise, DP-SGD (docs/privacy.md)

  def __post_init__(self):
    split_lib.check_split(self.model, self.split_k)

  @property
  def has_server_layers(self) -> bool:
    return split_lib.has_server_layers(self.model, self.split_k)

  @property
  def needs_rng(self) -> bool:
    """Whether a step draws random numbers (LoRA dropout, boundary noise, DP-SGD noise)."""
    return self.lora.dropout > 0 or self.defences.noisy_boundary or self.defences.dp_sgd


def _tree_add(*trees):
  return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *trees)


def loss_and_grads(base, adapters, inputs: model_lib.Inputs, loss_mask, prefix_loss_mask, sc: SplitConfig,
                   rng=None):
  """(sum of label NLLs, label count, adapter gradients of the sum) through the explicit split."""
  rngs = [None] * 3 if rng is None else list(jax.random.split(rng, 3))
  cfg, lcfg, k = sc.model, sc.lora, sc.split_k

  def client_front(a):
    h = model_lib.front(base, a, inputs, cfg, lcfg, k, rngs[0], sc.remat)
    return defences_lib.clip_boundary(h, sc.defences) if sc.has_server_layers else h

  def server_middle(a, h_k):
    return model_lib.middle(base, a, h_k, inputs, cfg, lcfg, k, rngs[1], sc.remat)

  def client_back(a, h_last):
    h = model_lib.back_hidden(base, a, h_last, inputs, cfg, lcfg, rngs[2], sc.remat)
    return loss_lib.packed_nll(base, h, inputs, loss_mask, prefix_loss_mask, cfg, sc.loss_chunk)

  h_k, front_vjp = jax.vjp(client_front, adapters)  # client -> server: h_k
  if sc.has_server_layers:  # boundary noise (docs/privacy.md): the server receives and runs noisy states
    h_k = defences_lib.noise_boundary(h_k, sc.defences, rng)
  h_last, middle_vjp = jax.vjp(server_middle, adapters, h_k)  # server -> client: h_{L-1}
  (total, count), back_vjp = jax.vjp(client_back, adapters, h_last)
  g_back, dh_last = back_vjp((jnp.ones_like(total), jnp.zeros_like(count)))  # client -> server: dL/dh_{L-1}
  g_middle, dh_k = middle_vjp(dh_last)  # server -> client: dL/dh_k
  (g_front,) = front_vjp(dh_k)
  return total, count, _tree_add(g_front, g_middle, g_back)


def loss_only(base, adapters, inputs: model_lib.Inputs, loss_mask, prefix_loss_mask, sc: SplitConfig):
  """(sum of label NLLs, label count) without gradients (validation); the split does not change it."""
  h = model_lib.forward_hidden(base, adapters, inputs, sc.model, sc.lora)
  return loss_lib.packed_nll(base, h, inputs, loss_mask, prefix_loss_mask, sc.model, sc.loss_chunk)


def boundary_bytes(rows: int, row_len: int, prefix_len: int, sc: SplitConfig) -> int:
  """Bytes crossing the client/server boundary for one forward+backward of [rows, row_len] tokens.

  Four arrays cross: h_k and h_{L-1} (activations) and their gradients, each [rows*row_len + prefix_len, D]
  in the compute dtype. Nothing crosses when the server holds no layers (k = L-1).
  """
  if not sc.has_server_layers:
    return 0
  itemsize = jnp.dtype(sc.model.compute_dtype).itemsize
  return 4 * (rows * row_len + prefix_len) * sc.model.hidden_size * itemsize


def dp_step_loss_and_grads(base, adapters, batch, prefix_tokens, prefix_loss_mask, sc: SplitConfig, rng):
  """(NLL sum, label count, gradient) of one optimizer step's rows `batch` (tokens, positions, segment ids,
  loss mask) under DP-SGD: per-example gradients through the split, clipped, summed and noised."""
  tokens, positions, segment_ids, loss_mask = batch
  inputs = model_lib.Inputs(tokens, positions, segment_ids, prefix_tokens)
  per_example = lambda b, a, i, m, p, r: loss_and_grads(b, a, i, m, p, sc, r)
  return defences_lib.dp_loss_and_grads(per_example, base, adapters, inputs, loss_mask, prefix_loss_mask,
                                        sc.defences, rng)
