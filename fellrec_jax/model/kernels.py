"""The numerical kernels of the Llama: norms, rotary embedding, LoRA products and softmax attention.

Plain functions over arrays, several with hand-written VJPs (each says why): the NNX modules (llama.py)
and every hot path (training, the streamed round, generation, title scoring) call these, so one
implementation of each operation serves them all.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def rms_norm(x, weight, eps: float):
  """RMSNorm computed in float32, as Hugging Face's LlamaRMSNorm."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(cfg) -> tuple[np.ndarray, float]:
  """Inverse rotary frequencies [Dh/2] and the attention scaling, per rope type (as transformers)."""
  dim = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  inv_freq = inv_freq.astype(np.float32)
  params = dict(cfg.rope_scaling)
  if cfg.rope_type == "linear":
    inv_freq = inv_freq / np.float32(params["factor"])
  elif cfg.rope_type == "llama3":
    inv_freq = _llama3_inv_freq(inv_freq, params)
  return inv_freq.astype(np.float32), 1.0


def _llama3_inv_freq(inv_freq: np.ndarray, params: dict) -> np.ndarray:
  factor = params["factor"]
  low, high = params["low_freq_factor"], params["high_freq_factor"]
  old_context = params["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions, cfg):
  """cos and sin tables [..., Dh] for integer positions [...], in the compute dtype."""
  inv_freq, scaling = rope_inv_freq(cfg)
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  dtype = cfg.compute_dtype
  return (jnp.cos(emb) * scaling).astype(dtype), (jnp.sin(emb) * scaling).astype(dtype)


@jax.custom_vjp
def apply_rope(x_TxNxH, cos_TxH, sin_TxH):
  """Rotary embedding (the half-split convention of Hugging Face Llama checkpoints).

  Its VJP is the inverse rotation (sin -> -sin), one elementwise pass: the tables repeat their first
  half in their second (rope_tables), so rotate_half commutes with them. Positions are not differentiated.
  """
  half = x_TxNxH.shape[-1] // 2
  rotated = jnp.concatenate([-x_TxNxH[..., half:], x_TxNxH[..., :half]], axis=-1)
  return x_TxNxH * cos_TxH[..., None, :] + rotated * sin_TxH[..., None, :]


def _apply_rope_fwd(x_TxNxH, cos_TxH, sin_TxH):
  return apply_rope(x_TxNxH, cos_TxH, sin_TxH), (cos_TxH, sin_TxH)


def _apply_rope_bwd(tables, g_TxNxH):
  cos_TxH, sin_TxH = tables
  return apply_rope(g_TxNxH, cos_TxH, -sin_TxH), None, None


apply_rope.defvjp(_apply_rope_fwd, _apply_rope_bwd)


class StreamLora(NamedTuple):
  """One projection's LoRA for the tokens of C clients in one stream (the streamed round): every client's adapter
  side by side, and each token's client."""

  a: jax.Array  # [D, C*r]: client c's a in columns c*r .. c*r+r-1
  b: jax.Array  # [C*r, O]
  clients: jax.Array  # [S, C] bool: the client of each token


class DropoutKeys(NamedTuple):
  """The randomness of LoRA dropout over a set of tokens, one client's or several clients' at once.

  Token i's keep mask for one projection is drawn from its client's key `keys[owner[i]]` (folded with the
  layer and the projection, `fold_in`) and its id `ids[i]` in that client's step, and from nothing else:
  a token gets the same mask whichever other tokens, clients or layout (rows, streams, lanes, devices) it
  is computed with.
  """

  keys: jax.Array  # [K, 2] uint32 PRNG keys (one per client)
  owner: jax.Array  # [...] int32: each token's key
  ids: jax.Array  # [...] int32: each token's id in its client's step

  def fold_in(self, data) -> DropoutKeys:
    """Every client's key folded with `data` (a layer index, a projection's index)."""
    return self._replace(keys=jax.vmap(jax.random.fold_in, in_axes=(0, None))(self.keys, data))


def dropout_keys(rng, token_shape: tuple[int, ...]) -> DropoutKeys:
  """`rng` as DropoutKeys of tokens [*token_shape]: a single PRNG key numbers them in order."""
  if isinstance(rng, DropoutKeys):
    return rng
  ids = jnp.arange(math.prod(token_shape), dtype=jnp.int32).reshape(token_shape)
  return DropoutKeys(jnp.asarray(rng)[None], jnp.zeros(token_shape, jnp.int32), ids)


def lora_dropout(x, rng, rate: float):
  """Inverted dropout of x [..., D] (kept values scaled by 1 / (1 - rate)), as PEFT's lora_dropout, with
  each token's mask drawn from its own key (`DropoutKeys`; a single key numbers the tokens).

  The token's key is threefry's (jax.random.fold_in of its client's key and its id); its D keep bits are
  murmur3's 32-bit finaliser of (token key, feature index), `bits >= rate * 2^32`: uniform to the test's
  precision and ~20x cheaper on a CPU than threefry words for every value, which made dropout cost ~7% of
  a streamed round.
  """
  dk = dropout_keys(rng, x.shape[:-1])
  token_keys = jax.vmap(jax.random.fold_in)(dk.keys[dk.owner.reshape(-1)], dk.ids.reshape(-1))
  if jnp.issubdtype(token_keys.dtype, jax.dtypes.prng_key):
    token_keys = jax.random.key_data(token_keys)
  features = jnp.arange(x.shape[-1], dtype=jnp.uint32) * np.uint32(0x9E3779B9)
  bits = _mix32(token_keys[:, :1] ^ _mix32(token_keys[:, 1:] + features[None]))
  keep = bits.reshape(x.shape) >= np.uint32(round(rate * 2.0**32))
  return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), 0).astype(x.dtype)


def _mix32(h):
  """murmur3's 32-bit finaliser (uint32): each input bit flips each output bit with probability ~1/2."""
  h = h ^ (h >> 16)
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_delta(x, a_DxR, b_RxO, scale: float):
  """(x @ a @ b) * scale; its VJP keeps x in its own layout."""
  return (x @ a_DxR) @ b_RxO * jnp.asarray(scale, x.dtype)


def _lora_delta_fwd(x, a_DxR, b_RxO, scale):
  xa = x @ a_DxR
  return xa @ b_RxO * jnp.asarray(scale, x.dtype), (x, a_DxR, b_RxO, xa)


def _lora_delta_bwd(scale, residuals, g):
  # Weight gradients as [r, .] products over all positions: contracting the positions of x and of the
  # cotangent in place, instead of a transposed copy of x (which XLA's CPU matmuls would otherwise make).
  x, a_DxR, b_RxO, xa = residuals
  g = g * jnp.asarray(scale, g.dtype)
  g_xa = g @ b_RxO.T
  flat = lambda t: t.reshape(-1, t.shape[-1])
  da = jnp.einsum("mr,md->rd", flat(g_xa), flat(x)).T
  db = jnp.einsum("mr,mo->ro", flat(xa), flat(g))
  return g_xa @ a_DxR.T, da.astype(a_DxR.dtype), db.astype(b_RxO.dtype)


lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def stream_lora_delta(x_SxD, a_DxM, b_MxO, clients_SxC, scale: float):
  """Each token's own client's (x @ a_c @ b_c) * scale: x @ [a_0 .. a_C-1], the other clients' columns
  zeroed, @ [b_0; ..; b_C-1] (the zeros add exactly nothing)."""
  return _stream_lora_delta_fwd(x_SxD, a_DxM, b_MxO, clients_SxC, scale)[0]


def _own_columns(clients_SxC, columns: int):
  return jnp.repeat(clients_SxC, columns // clients_SxC.shape[1], axis=1)


def _stream_lora_delta_fwd(x_SxD, a_DxM, b_MxO, clients_SxC, scale):
  own = _own_columns(clients_SxC, a_DxM.shape[1])
  xa = jnp.where(own, x_SxD @ a_DxM, 0)
  return xa @ b_MxO * jnp.asarray(scale, x_SxD.dtype), (x_SxD, a_DxM, b_MxO, own, xa)


def _stream_lora_delta_bwd(scale, residuals, g_SxO):
  x, a_DxM, b_MxO, own, xa = residuals
  g = g_SxO * jnp.asarray(scale, g_SxO.dtype)
  g_xa = jnp.where(own, g @ b_MxO.T, 0)
  da = jnp.einsum("sm,sd->md", g_xa, x).T  # as lora_delta_bwd: no transposed copy of x
  db = jnp.einsum("sm,so->mo", xa, g)
  return g_xa @ a_DxM.T, da.astype(a_DxM.dtype), db.astype(b_MxO.dtype), None


stream_lora_delta.defvjp(_stream_lora_delta_fwd, _stream_lora_delta_bwd)


def attend(q_RxTxKxGxH, blocks, scale: float):
  """Softmax attention of queries over several key/value blocks (a block: (k, v, mask, shared)).

  A `shared` block has keys [S, K, H] seen by every row (the prompt prefix, no mask); otherwise keys are
  [R, S, K, H] with a mask [R, T, S]. Scores are computed in the compute dtype and normalised in float32,
  as Hugging Face's eager attention does. The blocks are joined along the keys and the products are laid
  out as [R, K, (G T), .] matmuls, the shapes CPU matmul kernels run fastest.
  """
  R, T, K, G, H = q_RxTxKxGxH.shape
  if T == 0:  # an empty prefix
    return q_RxTxKxGxH
  keys, values, masks = [], [], []
  for k, v, mask, shared in blocks:
    if shared:
      k, v = (jnp.broadcast_to(t, (R, *t.shape)) for t in (k, v))
      mask = jnp.ones((R, T, k.shape[1]), bool)
    keys.append(k)
    values.append(v)
    masks.append(mask)
  k_RxSxKxH, v_RxSxKxH = jnp.concatenate(keys, axis=1), jnp.concatenate(values, axis=1)
  q_RxKxQxH = q_RxTxKxGxH.transpose(0, 2, 3, 1, 4).reshape(R, K, G * T, H)  # Q = (g, t)
  out_RxKxQxH = _softmax_attention(q_RxKxQxH, k_RxSxKxH.transpose(0, 2, 3, 1), v_RxSxKxH.transpose(0, 2, 1, 3),
                                   jnp.concatenate(masks, axis=-1), scale)
  return out_RxKxQxH.reshape(R, K, G, T, H).transpose(0, 3, 1, 2, 4)


def _attention_probs(q_RxKxQxH, k_RxKxHxS, mask_RxTxS):
  """Probabilities [R, K, Q, S] in the compute dtype (queries Q = (g, t): the mask broadcasts over g)."""
  dtype = q_RxKxQxH.dtype
  R, K, Q, _ = q_RxKxQxH.shape
  T, S = mask_RxTxS.shape[1:]
  s = jnp.matmul(q_RxKxQxH, k_RxKxHxS).reshape(R, K, Q // T, T, S)
  s = jnp.where(mask_RxTxS[:, None, None], s, jnp.finfo(dtype).min)
  return jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(dtype).reshape(R, K, Q, S)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention(q_RxKxQxH, k_RxKxHxS, v_RxKxSxH, mask_RxTxS, scale: float):
  """softmax(q k * scale, masked) v, with a VJP that reads the probabilities once.

  The scale multiplies the queries ([Q, H]), not the scores ([Q, S]): XLA CPU materialises a score-sized
  broadcast of a scalar factor of the scores, in the forward and in the backward pass.
  """
  return _softmax_attention_fwd(q_RxKxQxH, k_RxKxHxS, v_RxKxSxH, mask_RxTxS, scale)[0]


def _softmax_attention_fwd(q_RxKxQxH, k_RxKxHxS, v_RxKxSxH, mask_RxTxS, scale):
  q_scaled = q_RxKxQxH * jnp.asarray(scale, q_RxKxQxH.dtype)
  probs = _attention_probs(q_scaled, k_RxKxHxS, mask_RxTxS)
  out = jnp.matmul(probs, v_RxKxSxH)
  return out, (q_scaled, k_RxKxHxS, v_RxKxSxH, probs, out)


def _softmax_attention_bwd(scale, residuals, g_RxKxQxH):
  # The softmax backward needs rowsum(P * dP) = rowsum(g * out) (out = P v): a sum over H, not over S.
  # Masked entries have P = 0, so their score gradient is 0 as in the plain VJP.
  q_scaled, k, v, probs, out = jax.lax.optimization_barrier(residuals)  # else XLA CPU recomputes out
  dtype = q_scaled.dtype
  d_probs = jnp.matmul(g_RxKxQxH, jnp.swapaxes(v, -1, -2)).astype(jnp.float32)
  row = jnp.sum(g_RxKxQxH.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_scores = (probs.astype(jnp.float32) * (d_probs - row)).astype(dtype)
  dq = jnp.matmul(d_scores, jnp.swapaxes(k, -1, -2)) * jnp.asarray(scale, dtype)
  dk = jnp.matmul(jnp.swapaxes(q_scaled, -1, -2), d_scores)
  dv = jnp.matmul(jnp.swapaxes(probs, -1, -2), g_RxKxQxH)
  return dq, dk, dv, None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)
