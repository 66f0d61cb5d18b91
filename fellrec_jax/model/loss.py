"""Next-token loss over packed rows with a shared prefix.

A token is predicted from the hidden state before it: the previous token of its segment, or, for the
first token after the shared prefix, the prefix's last position. The prefix's own loss terms are the same
for every example, so they are computed once and weighted by the number of examples (PERFORMANCE.md,
lever 1). The loss returns (sum of token NLLs, number of label tokens) so that gradient accumulation and
multi-step averaging can normalise by the true token count.

The head and the cross-entropy are fused (`weighted_nll`): logits exist one chunk at a time, and the
gradient with respect to the hidden states is formed in the forward pass, so that neither the [N, V]
logits nor the softmax are kept for the backward pass (PERFORMANCE.md, lever 4).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fellrec_jax.model import llama as model_lib


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


def weighted_nll(base, h_NxD, targets_N, weights_N, cfg, chunk: int = 0):
  """sum_i weights_i * NLL_i of targets under the head, fused with its gradient (see the module doc).

  Equal to `jnp.sum(weights * token_nll(...))` in value and in gradients with respect to the hidden
  states, the head and the weights; the head's gradient is recomputed chunk by chunk only when asked for.
  """
  return jnp.sum(weighted_token_nll(base, h_NxD, targets_N, weights_N, cfg, chunk))


def weighted_token_nll(base, h_NxD, targets_N, weights_N, cfg, chunk: int = 0):
  """weights_i * NLL_i [N], fused with its gradient as `weighted_nll`."""
  dtype = cfg.compute_dtype
  w_DxV = model_lib.head_weight(base).astype(dtype)
  return _fused_nll(h_NxD.astype(dtype), w_DxV, targets_N, weights_N.astype(jnp.float32), chunk)


def chunk_size(chunk: int, n: int) -> int:
  """The positions per chunk when n positions are split into chunks of at most `chunk` (0: one chunk):
  ceil(n / chunk) equal chunks, rounded up to a multiple of 8, so that padding stays under 8 positions a
  chunk (3,756 positions by 512 are 8 chunks of 472, not of 512: 8% less head work)."""
  if not chunk or n <= chunk:
    return n
  size = -(-n // -(-n // chunk))
  return min(-(-size // 8) * 8, chunk)


def _chunks(chunk: int, n: int, *arrays):
  """Arrays [N, ...] padded and reshaped to [chunks, chunk_size, ...] (one chunk when chunk is 0)."""
  chunk = chunk_size(chunk, n)
  pad = -n % chunk
  return [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(-1, chunk, *a.shape[1:]) for a in arrays]


def _dlogits(h_CxD, w_DxV, t_C, weight_C):
  """(NLL [C], d(weight * NLL)/d logits [C, V] in float32) of one chunk."""
  logits = (h_CxD @ w_DxV).astype(jnp.float32)  # as model.lm_logits
  lse = jax.nn.logsumexp(logits, axis=-1)
  nll = lse - jnp.take_along_axis(logits, t_C[:, None], axis=-1)[:, 0]
  probs = jnp.exp(logits - lse[:, None])
  onehot = jnp.arange(logits.shape[-1])[None, :] == t_C[:, None]
  return nll, (probs - onehot) * weight_C[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_nll(h_NxD, w_DxV, targets_N, weights_N, chunk):
  return _fused_nll_fwd(h_NxD, w_DxV, targets_N, weights_N, chunk)[0]


def _fused_nll_fwd(h_NxD, w_DxV, targets_N, weights_N, chunk):
  N = h_NxD.shape[0]

  def one(xs):
    h, t, weight = xs
    nll, dlogits = _dlogits(h, w_DxV, t, weight)
    return nll, dlogits.astype(h.dtype) @ w_DxV.T

  nll, dh = jax.lax.map(one, tuple(_chunks(chunk, N, h_NxD, targets_N, weights_N)))
  nll, dh = nll.reshape(-1)[:N], dh.reshape(-1, h_NxD.shape[1])[:N]
  return nll * weights_N, (h_NxD, w_DxV, targets_N, weights_N, nll, dh)


def _fused_nll_bwd(chunk, residuals, g_N):
  h_NxD, w_DxV, targets_N, weights_N, nll, dh = residuals

  def head_grad(dw, xs):  # dead code (removed by XLA) unless the head itself is differentiated
    h, t, weight, g = xs
    _, dlogits = _dlogits(h, w_DxV, t, weight * g)
    return dw + h.T @ dlogits.astype(h.dtype), None

  xs = tuple(_chunks(chunk, h_NxD.shape[0], h_NxD, targets_N, weights_N, g_N))
  dw, _ = jax.lax.scan(head_grad, jnp.zeros(w_DxV.shape, w_DxV.dtype), xs)
  return (g_N[:, None].astype(dh.dtype) * dh, dw, None, g_N * nll)


_fused_nll.defvjp(_fused_nll_fwd, _fused_nll_bwd)


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
  loss_mask = loss_mask.astype(jnp.float32)
  hidden, targets, weights = previous.reshape(R * T, D), inputs.tokens.reshape(-1), loss_mask.reshape(-1)
  count = jnp.sum(loss_mask)
  if P > 1:
    num_examples = jnp.sum(starts).astype(jnp.float32)
    prefix_weights = num_examples * prefix_loss_mask[1:].astype(jnp.float32)
    hidden = jnp.concatenate([hidden, h.prefix[:-1].astype(hidden.dtype)])
    targets = jnp.concatenate([targets, inputs.prefix_tokens[1:]])
    weights = jnp.concatenate([weights, prefix_weights])
    count = count + jnp.sum(prefix_weights)
  return weighted_nll(base, hidden, targets, weights, cfg, chunk), count
