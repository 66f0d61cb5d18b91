"""Next-token loss over packed rows with a shared prompt prefix.

A token is predicted from the hidden state before it: the previous token of its segment, or, for the
first token after the shared prefix, the prefix's last position. The prefix's own loss terms are the same
for every example, so they are computed once and weighted by the number of examples (PERFORMANCE.md,
lever 1). The loss returns (sum of token NLLs, number of label tokens) so that gradient accumulation and
multi-step averaging can normalise by the true token count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fellrec_jax import model as model_lib


def token_nll(base, h_NxD, targets_N, cfg, chunk: int = 0):
  """Per-token negative log-likelihood [N] of targets under the head; in chunks of `chunk` positions."""
  N = h_NxD.shape[0]

  def nll(h, t):
    logits = model_lib.lm_logits(base, h, cfg)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]

  if not chunk or N <= chunk:
    return nll(h_NxD, targets_N)
  pad = -N % chunk
  h = jnp.pad(h_NxD, ((0, pad), (0, 0))).reshape(-1, chunk, h_NxD.shape[1])
  t = jnp.pad(targets_N, (0, pad)).reshape(-1, chunk)
  # Recompute each chunk's logits in the backward pass instead of keeping all N x V of them.
  out = jax.lax.map(jax.checkpoint(lambda xs: nll(*xs)), (h, t))
  return out.reshape(-1)[:N]


def segment_starts(inputs: model_lib.Inputs):
  """[R, T] bool: the first token of each example in the rows (its position equals the prefix length)."""
  return (inputs.positions == inputs.prefix_tokens.shape[0]) & (inputs.segment_ids > 0)


def packed_nll(base, h: model_lib.Activations, inputs: model_lib.Inputs, loss_mask, prefix_loss_mask, cfg,
               chunk: int = 0):
  """(sum of label-token NLLs, label-token count) of one step's packed rows and shared prefix."""
  R, T, D = h.rows.shape
  P = h.prefix.shape[0]
  starts = segment_starts(inputs)
  previous = jnp.concatenate([jnp.zeros((R, 1, D), h.rows.dtype), h.rows[:, :-1]], axis=1)
  if P:
    previous = jnp.where(starts[..., None], h.prefix[-1].astype(h.rows.dtype), previous)
  nll = token_nll(base, previous.reshape(R * T, D), inputs.tokens.reshape(-1), cfg, chunk).reshape(R, T)
  loss_mask = loss_mask.astype(jnp.float32)
  total, count = jnp.sum(nll * loss_mask), jnp.sum(loss_mask)
  if P > 1:
    num_examples = jnp.sum(starts).astype(jnp.float32)
    prefix_mask = prefix_loss_mask[1:].astype(jnp.float32)
    prefix_nll = token_nll(base, h.prefix[:-1], inputs.prefix_tokens[1:], cfg, chunk)
    total = total + num_examples * jnp.sum(prefix_nll * prefix_mask)
    count = count + num_examples * jnp.sum(prefix_mask)
  return total, count
