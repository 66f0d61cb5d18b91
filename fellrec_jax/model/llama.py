"""A Llama decoder as pure functions over parameter pytrees, split for split learning.

Parameters are a nested dict of arrays (the "base"): `embed` [V, D], `layers` (every leaf stacked on a
leading layer axis L, projection kernels stored [in, out]), `norm` [D] and `lm_head` [D, V] (absent when
the embeddings are tied). LoRA adapters (lora.py) are a separate pytree with the same layer axis, so
that they can be stacked per client and differentiated alone.

The forward pass works on `Activations`: packed rows of tokens [R, T] plus an optional prompt prefix [P]
shared by every row (PERFORMANCE.md, lever 1). Rows attend to the whole prefix and, causally, to the
tokens of their own segment (several examples may be packed in one row). With P = 0 and one segment per
row this is exactly Hugging Face's `LlamaForCausalLM` with an attention mask.

The split of SPEC §3: `front` (embeddings + layers [0, k)), `middle` (layers [k, L-1)) and `back`
(layer L-1 + final norm + head). Their composition is `forward`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fellrec_jax import lora as lora_lib

Params = dict[str, Any]

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
UNROLL_LAYERS = 8  # parts with at most this many layers are unrolled (run_layers)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama decoder (the fields of a Hugging Face `LlamaConfig` that change numbers)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # Extra rope parameters as sorted (key, value) pairs, e.g. (("factor", 8.0), ("rope_type", "llama3"), ...).
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  initializer_range: float = 0.02
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  pad_token_id: int | None = None
  # Compute dtype of activations and matmuls ("float32" or "bfloat16"); norms and softmax run in float32.
  dtype: str = "float32"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    rope_type = self.rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise NotImplementedError(f"rope_type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")

  @property
  def rope_type(self) -> str:
    return dict(self.rope_scaling).get("rope_type", "default")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **changes) -> LlamaConfig:
    return dataclasses.replace(self, **changes)


class Inputs(NamedTuple):
  """Token inputs of one forward pass (one client step)."""

  tokens: jax.Array  # [R, T] int32, packed rows
  positions: jax.Array  # [R, T] int32, position of each token in its example (prefix included)
  segment_ids: jax.Array  # [R, T] int32, 1..n for the examples of a row, 0 on padding
  prefix_tokens: jax.Array  # [P] int32, the prompt prefix shared by every example (P may be 0)


class Activations(NamedTuple):
  """Hidden states of the rows and of the shared prefix: what crosses the client/server boundary."""

  rows: jax.Array  # [R, T, D]
  prefix: jax.Array  # [P, D]


class _Context(NamedTuple):
  """Per-forward constants derived from the inputs: rotary tables and attention masks."""

  rows_cos: jax.Array  # [R, T, Dh]
  rows_sin: jax.Array
  prefix_cos: jax.Array  # [P, Dh]
  prefix_sin: jax.Array
  rows_mask: jax.Array  # [R, T, T] bool: same segment and causal
  prefix_mask: jax.Array  # [P, P] bool: causal


def plain_inputs(tokens, attention_mask=None, positions=None) -> Inputs:
  """Inputs for unpacked sequences: one example per row, padding given by `attention_mask`."""
  tokens = jnp.asarray(tokens, jnp.int32)
  mask = jnp.ones_like(tokens) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return Inputs(tokens, jnp.asarray(positions, jnp.int32), mask, jnp.zeros((0,), jnp.int32))


# ----------------------------------------------------------------------------------------------------
# Parameters


def init_params(cfg: LlamaConfig, rng: jax.Array, param_dtype=jnp.float32) -> Params:
  """Random base parameters, initialised as Hugging Face does (normal(0, initializer_range), norms 1)."""
  d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  shapes = {
      "q_proj": (d, cfg.num_heads * cfg.head_dim),
      "k_proj": (d, cfg.num_kv_heads * cfg.head_dim),
      "v_proj": (d, cfg.num_kv_heads * cfg.head_dim),
      "o_proj": (cfg.num_heads * cfg.head_dim, d),
      "gate_proj": (d, f),
      "up_proj": (d, f),
      "down_proj": (f, d),
  }
  keys = jax.random.split(rng, len(shapes) + 2)
  normal = lambda key, shape: (cfg.initializer_range * jax.random.normal(key, shape)).astype(param_dtype)
  layers = {name: normal(key, (L, *shape)) for key, (name, shape) in zip(keys, shapes.items())}
  layers["input_norm"] = jnp.ones((L, d), param_dtype)
  layers["post_norm"] = jnp.ones((L, d), param_dtype)
  for name, (_, out) in shapes.items():
    if _has_bias(cfg, name):
      layers[name + "_bias"] = jnp.zeros((L, out), param_dtype)
  params = {"embed": normal(keys[-2], (cfg.vocab_size, d)), "layers": layers, "norm": jnp.ones((d,), param_dtype)}
  if not cfg.tie_word_embeddings:
    params["lm_head"] = normal(keys[-1], (d, cfg.vocab_size))
  return params


def _has_bias(cfg: LlamaConfig, name: str) -> bool:
  return cfg.attention_bias if name in ATTENTION_PROJECTIONS else cfg.mlp_bias


def slice_layers(tree, start: int, stop: int):
  """Layers [start, stop) of a layer-stacked pytree."""
  return jax.tree.map(lambda x: x[start:stop], tree)


def check_split(cfg: LlamaConfig, k: int) -> None:
  """Raise if k is not a valid split point (0 <= k <= L-1: the last layer always stays on the client)."""
  if not 0 <= k <= cfg.num_layers - 1:
    raise ValueError(
        f"split_k={k} is impossible for a model with num_layers={cfg.num_layers}: the client keeps layers "
        f"[0, k) and layer L-1, so k must be in [0, {cfg.num_layers - 1}]")


# ----------------------------------------------------------------------------------------------------
# Building blocks


def rms_norm(x, weight, eps: float):
  """RMSNorm computed in float32, as Hugging Face's LlamaRMSNorm."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> tuple[np.ndarray, float]:
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


def rope_tables(positions, cfg: LlamaConfig):
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


def project(x, layer: Params, adapters: Params, name: str, cfg: LlamaConfig, lcfg: lora_lib.LoraConfig, rng):
  """x @ W (+ bias) + LoRA(x) for one projection of one layer."""
  dtype = cfg.compute_dtype
  y = x @ layer[name].astype(dtype)
  if name + "_bias" in layer:
    y = y + layer[name + "_bias"].astype(dtype)
  if name in adapters:
    if rng is not None and lcfg.dropout > 0.0:
      keep = jax.random.bernoulli(rng, 1.0 - lcfg.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - lcfg.dropout), 0).astype(x.dtype)
    adapter = adapters[name]
    if isinstance(adapter, StreamLora):
      return y + _stream_lora_delta(x, adapter.a.astype(dtype), adapter.b.astype(dtype), adapter.clients,
                                    lcfg.scale)
    y = y + _lora_delta(x, adapter["a"].astype(dtype), adapter["b"].astype(dtype), lcfg.scale)
  return y


class StreamLora(NamedTuple):
  """One projection's LoRA for the tokens of C clients in one stream (stream.py): every client's adapter
  side by side, and each token's client."""

  a: jax.Array  # [D, C*r]: client c's a in columns c*r .. c*r+r-1
  b: jax.Array  # [C*r, O]
  clients: jax.Array  # [S, C] bool: the client of each token


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lora_delta(x, a_DxR, b_RxO, scale: float):
  """(x @ a @ b) * scale, as lora.lora_delta without dropout; its VJP keeps x in its own layout."""
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


_lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _stream_lora_delta(x_SxD, a_DxM, b_MxO, clients_SxC, scale: float):
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
  da = jnp.einsum("sm,sd->md", g_xa, x).T  # as _lora_delta_bwd: no transposed copy of x
  db = jnp.einsum("sm,so->mo", xa, g)
  return g_xa @ a_DxM.T, da.astype(a_DxM.dtype), db.astype(b_MxO.dtype), None


_stream_lora_delta.defvjp(_stream_lora_delta_fwd, _stream_lora_delta_bwd)


def _layer_rng(rng, index):
  return None if rng is None else jax.random.fold_in(rng, index)


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


def _qkv(x, layer, adapters, cos, sin, cfg, lcfg, rng):
  """Rotated queries [.., T, K, G, H] and keys/values [.., T, K, H] of hidden states [.., T, D]."""
  K, G, H = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
  q = project(x, layer, adapters, "q_proj", cfg, lcfg, _layer_rng(rng, 0))
  k = project(x, layer, adapters, "k_proj", cfg, lcfg, _layer_rng(rng, 1))
  v = project(x, layer, adapters, "v_proj", cfg, lcfg, _layer_rng(rng, 2))
  q = apply_rope(q.reshape(*q.shape[:-1], K * G, H), cos, sin)
  k = apply_rope(k.reshape(*k.shape[:-1], K, H), cos, sin)
  return q.reshape(*q.shape[:-2], K, G, H), k, v.reshape(*v.shape[:-1], K, H)


def _mlp(x, layer, adapters, cfg, lcfg, rng):
  gate = project(x, layer, adapters, "gate_proj", cfg, lcfg, _layer_rng(rng, 4))
  up = project(x, layer, adapters, "up_proj", cfg, lcfg, _layer_rng(rng, 5))
  return project(jax.nn.silu(gate) * up, layer, adapters, "down_proj", cfg, lcfg, _layer_rng(rng, 6))


def _finish_layer(x, attn_out, layer, adapters, cfg, lcfg, rng):
  """Attention output projection, residual, then the MLP block with its residual."""
  attn_out = attn_out.reshape(*attn_out.shape[:-3], cfg.num_heads * cfg.head_dim)
  x = x + project(attn_out, layer, adapters, "o_proj", cfg, lcfg, _layer_rng(rng, 3))
  h = rms_norm(x, layer["post_norm"], cfg.rms_norm_eps)
  return x + _mlp(h, layer, adapters, cfg, lcfg, rng)


# ----------------------------------------------------------------------------------------------------
# Decoder layers over packed rows and a shared prefix


def _context(inputs: Inputs, cfg: LlamaConfig) -> _Context:
  rows_cos, rows_sin = rope_tables(inputs.positions, cfg)
  num_prefix = inputs.prefix_tokens.shape[0]
  prefix_cos, prefix_sin = rope_tables(jnp.arange(num_prefix, dtype=jnp.int32), cfg)
  seg = inputs.segment_ids
  T = seg.shape[1]
  causal = jnp.tril(jnp.ones((T, T), bool))
  rows_mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0) & causal
  prefix_mask = jnp.tril(jnp.ones((num_prefix, num_prefix), bool))
  return _Context(rows_cos, rows_sin, prefix_cos, prefix_sin, rows_mask, prefix_mask)


def decoder_layer(x: Activations, layer: Params, adapters: Params, ctx: _Context, cfg: LlamaConfig,
                  lcfg: lora_lib.LoraConfig, rng=None) -> Activations:
  """One decoder layer over the rows and the prefix (the rows also attend to the prefix's keys)."""
  scale = cfg.head_dim ** -0.5
  rng_rows, rng_prefix = (None, None) if rng is None else jax.random.split(rng)
  h_rows = rms_norm(x.rows, layer["input_norm"], cfg.rms_norm_eps)
  h_prefix = rms_norm(x.prefix, layer["input_norm"], cfg.rms_norm_eps)
  q_r, k_r, v_r = _qkv(h_rows, layer, adapters, ctx.rows_cos, ctx.rows_sin, cfg, lcfg, rng_rows)
  q_p, k_p, v_p = _qkv(h_prefix, layer, adapters, ctx.prefix_cos, ctx.prefix_sin, cfg, lcfg, rng_prefix)
  attn_rows = attend(q_r, [(k_p, v_p, None, True), (k_r, v_r, ctx.rows_mask, False)], scale)
  attn_prefix = attend(q_p[None], [(k_p[None], v_p[None], ctx.prefix_mask[None], False)], scale)[0]
  rows = _finish_layer(x.rows, attn_rows, layer, adapters, cfg, lcfg, rng_rows)
  prefix = _finish_layer(x.prefix, attn_prefix, layer, adapters, cfg, lcfg, rng_prefix)
  return Activations(rows, prefix)


def run_layers(base: Params, adapters: Params, x: Activations, ctx: _Context, start: int, stop: int,
               cfg: LlamaConfig, lcfg: lora_lib.LoraConfig, rng=None, remat: bool = False) -> Activations:
  """Decoder layers [start, stop): unrolled up to UNROLL_LAYERS layers, else `lax.scan` over the layer axis.

  Unrolled, XLA keeps each layer's saved activations in their own buffers; a scan stacks them (a copy in
  and out of an [L, ...] buffer per layer), which costs ~15% of a CPU step at 4 layers.
  """
  if stop <= start:
    return x

  def body(x, xs):
    layer, layer_adapters, index = xs
    return decoder_layer(x, layer, layer_adapters, ctx, cfg, lcfg, _layer_rng(rng, index)), None

  if remat:
    body = jax.checkpoint(body)
  if stop - start <= UNROLL_LAYERS:
    for index in range(start, stop):
      take = lambda tree: jax.tree.map(lambda t: t[index], tree)
      x, _ = body(x, (take(base["layers"]), take(adapters), jnp.int32(index)))
    return x
  xs = (slice_layers(base["layers"], start, stop), slice_layers(adapters, start, stop), jnp.arange(start, stop))
  x, _ = jax.lax.scan(body, x, xs)
  return x


def embed(base: Params, inputs: Inputs, cfg: LlamaConfig) -> Activations:
  table = base["embed"]
  return Activations(table[inputs.tokens].astype(cfg.compute_dtype),
                     table[inputs.prefix_tokens].astype(cfg.compute_dtype))


def head_weight(base: Params) -> jax.Array:
  """The LM head kernel [D, V] (the transposed embeddings when they are tied)."""
  return base["lm_head"] if "lm_head" in base else base["embed"].T


def lm_logits(base: Params, h, cfg: LlamaConfig):
  """Float32 logits of final hidden states [..., D]."""
  logits = h.astype(cfg.compute_dtype) @ head_weight(base).astype(cfg.compute_dtype)
  return logits.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------
# The split: client front, server middle, client back


def front(base, adapters, inputs: Inputs, cfg, lcfg, k: int, rng=None, remat=False) -> Activations:
  """Client part before the server: embeddings and layers [0, k)."""
  return run_layers(base, adapters, embed(base, inputs, cfg), _context(inputs, cfg), 0, k, cfg, lcfg, rng,
                    remat)


def middle(base, adapters, x: Activations, inputs: Inputs, cfg, lcfg, k: int, rng=None,
           remat=False) -> Activations:
  """Server part: layers [k, L-1) on the hidden states h_k received from the client."""
  return run_layers(base, adapters, x, _context(inputs, cfg), k, cfg.num_layers - 1, cfg, lcfg, rng, remat)


def back_hidden(base, adapters, x: Activations, inputs: Inputs, cfg, lcfg, rng=None,
                remat=False) -> Activations:
  """Client part after the server: the last layer and the final norm (hidden states before the head)."""
  L = cfg.num_layers
  x = run_layers(base, adapters, x, _context(inputs, cfg), L - 1, L, cfg, lcfg, rng, remat)
  norm = lambda h: rms_norm(h, base["norm"], cfg.rms_norm_eps)
  return Activations(norm(x.rows), norm(x.prefix))


def back(base, adapters, x: Activations, inputs: Inputs, cfg, lcfg, rng=None) -> jax.Array:
  """Client part after the server: last layer, final norm and head; float32 logits [R, T, V]."""
  return lm_logits(base, back_hidden(base, adapters, x, inputs, cfg, lcfg, rng).rows, cfg)


def forward_hidden(base, adapters, inputs: Inputs, cfg, lcfg, rng=None, remat=False) -> Activations:
  """All layers and the final norm, unsplit (one scan over every layer)."""
  x = run_layers(base, adapters, embed(base, inputs, cfg), _context(inputs, cfg), 0, cfg.num_layers, cfg,
                 lcfg, rng, remat)
  norm = lambda h: rms_norm(h, base["norm"], cfg.rms_norm_eps)
  return Activations(norm(x.rows), norm(x.prefix))


def forward(base, adapters, inputs: Inputs, cfg, lcfg, rng=None) -> jax.Array:
  """Float32 logits [R, T, V] of the rows: what `LlamaForCausalLM` computes."""
  return lm_logits(base, forward_hidden(base, adapters, inputs, cfg, lcfg, rng).rows, cfg)
