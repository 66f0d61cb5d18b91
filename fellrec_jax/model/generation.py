"""Jitted generation with a KV cache: greedy and beam search, token for token as transformers' generate.

Prompts are a left-padded batch [B, Tp] with an attention mask, optionally after a prefix of tokens that
every prompt shares (the instruction template), encoded once (`encode_prefix`) and reused by every batch.
The cache keeps three segments of keys and values, each stored once for the rows that read it:

  prefix     [P, ...]        shared by every row of every batch
  prompt     [B, Tp, ...]    one per prompt, shared by its beams (never reordered)
  generated  [B, M * N, ...] one slot per new token and beam (step-major: a step's slots are contiguous,
                             written in one update); beams are never moved in memory: each beam reads the
                             slots of its history (`history`: which slot holds each step)

Positions follow transformers: cumsum(attention_mask) - 1 over prefix + prompt, so the split into prefix
and prompt does not change the result. Beam search reproduces transformers' vectorised `_beam_search`
(top 2*beams candidates, finished hypotheses scored by sum_logprobs / generated_length ** length_penalty,
the early-stop heuristic of `early_stopping=False`), including its -1e9 float32 sentinels; a batch stops as
soon as every prompt is done.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fellrec_jax.model import kernels
from fellrec_jax.model import lora as lora_lib
from fellrec_jax.model import llama as model_lib
from fellrec_jax.model import trie as trie_lib

NEG = -1.0e9  # transformers' sentinel for "not selectable"


class Prefix(NamedTuple):
  """Keys and values of the tokens every prompt starts with (P may be 0), positions last (`as_keys`)."""

  k: jax.Array  # [L, K, H, P] (every [L, ...] array here is kept `by_layer`)
  v: jax.Array  # [L, K, P, H]


class Cache(NamedTuple):
  """The keys and values a decoding step reads; each [L, ...] field is kept `by_layer`."""

  prefix: Prefix
  prompt_k: jax.Array  # [L, B, K, H, Tp]
  prompt_v: jax.Array  # [L, B, K, Tp, H]
  prompt_valid: jax.Array  # [B, Tp] bool: the position holds a real token
  k: jax.Array  # [L, B, K, H, M * N] generated tokens, slot t * N + n (step t, beam n), up to step index - 2
  v: jax.Array  # [L, B, K, M * N, H]
  last_k: jax.Array  # [L, B, K, H, N] step index - 1, written into k by the next decode (see decode)
  last_v: jax.Array  # [L, B, K, N, H]
  history: jax.Array  # [B, N, M, N] bool: beam n's step t is in slot (t, n') (steps up to `index`)
  index: jax.Array  # int32 scalar: the next step to compute


class Output(NamedTuple):
  tokens: jax.Array  # [B, max_new_tokens] generated tokens (pad after EOS)
  lengths: jax.Array  # [B] generated tokens up to and including EOS
  scores: jax.Array  # [B] transformers' sequence score (beam search) or sum of log-probs (greedy)


def common_prefix_length(token_lists) -> int:
  """The number of leading tokens all lists share, leaving every list at least one token of its own."""
  if not token_lists:
    return 0
  first, shortest = token_lists[0], min(len(t) for t in token_lists)
  n = 0
  while n < shortest - 1 and all(t[n] == first[n] for t in token_lists):
    n += 1
  return n


# ----------------------------------------------------------------------------------------------------
# Attention over segments of keys shared by groups of rows


# Scores (all segments) up to which one softmax over concatenated scores is used. Measured on a CPU: decoding
# steps of 16-64 prompts x 4 beams (0.2-0.8 M scores) run 8-12% faster concatenated, likelihood blocks of
# 8 prompts x 512 trie nodes (~3 M scores) 1.5x faster normalised per segment.
CONCAT_SCORES = 1 << 21


class Segment(NamedTuple):
  """Keys and values that query rows attend to, stored once for the rows that read them.

  Shared (`per_row=False`): the R query rows form Rk groups of R // Rk consecutive rows that read the same
  keys k [Rk, K, H, S] and values v [Rk, K, S, H] (`as_keys`, `as_values`: the layouts the products read, so
  a cache kept in them is never transposed); Rk = 1: every row. Per row (`per_row=True`, one query per
  row): row r reads its own k and v [R, S, K, H], the layout rows are gathered or computed in; products and
  sums, not R tiny matrix products. `mask` broadcasts to [Rk, R // Rk, T, S] (None: every key visible).
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array | None = None
  per_row: bool = False


def attend_segments(q_RxTxKxGxH, segments, scale: float, concat: bool | None = None):
  """Softmax attention of queries [R, T, K, G, H] over several `Segment`s; [R, T, K, G, H].

  A segment's keys are read once per group of rows, never copied per row. Scores are computed in the
  compute dtype, the softmax in float32 (as kernels.attend). Small scores (a decoding step) are
  concatenated for one softmax, the fewest operations; large ones (catalog likelihood) are normalised one
  segment at a time (each segment's maximum, exponentials, sum and weighted values, merged by their
  maxima), the fewest passes over memory; `concat` forces one or the other (None: by CONCAT_SCORES). A row
  sees at least one key (an all-masked row averages).
  """
  R, T, K, G, H = q_RxTxKxGxH.shape
  dtype = q_RxTxKxGxH.dtype
  q_RxTxKxGxH = q_RxTxKxGxH * jnp.asarray(scale, dtype)
  lowest = jnp.finfo(jnp.float32).min
  scores = []  # per segment, float32 and masked: shared [Rk, K, R // Rk, T, G, S], per row [R, S, K, G]
  for seg in segments:
    if seg.per_row:
      if T != 1 or seg.k.shape[0] != R:
        raise ValueError(f"a per-row segment needs one query per row: q {q_RxTxKxGxH.shape}, k {seg.k.shape}")
      s = jnp.sum(q_RxTxKxGxH[:, :1] * seg.k[:, :, :, None], axis=-1).astype(jnp.float32)
      mask = None if seg.mask is None else jnp.broadcast_to(seg.mask, (R, 1, 1, s.shape[1]))[:, 0, 0, :, None, None]
    else:
      Rk, S = seg.k.shape[0], seg.k.shape[-1]
      s = jnp.einsum("rntkgh,rkhs->rkntgs", q_RxTxKxGxH.reshape(Rk, R // Rk, T, K, G, H), seg.k).astype(jnp.float32)
      mask = None if seg.mask is None else jnp.broadcast_to(seg.mask, (Rk, R // Rk, T, S))[:, None, :, :, None, :]
    scores.append(s if mask is None else jnp.where(mask, s, lowest))
  if concat is None:
    concat = sum(s.size for s in scores) <= CONCAT_SCORES
  if concat:
    return _softmax_concatenated(scores, segments, q_RxTxKxGxH.shape, dtype)
  parts = []  # per segment: (max, sum of exponentials, weighted values), each [R, T, K, G, .] float32
  for seg, s in zip(segments, scores):
    if seg.per_row:  # [R, S, K, G]: reduce over axis 1
      m = jnp.max(s, axis=1)
      e = jnp.exp(s - m[:, None])
      total, out = jnp.sum(e, axis=1), _per_row_values(e.astype(dtype), seg.v)
      to_rows = lambda x: x.reshape(R, 1, K, G, -1)
    else:  # [Rk, K, R // Rk, T, G, S]: reduce over the last axis
      m = jnp.max(s, axis=-1, keepdims=True)
      e = jnp.exp(s - m)
      Rk, S = e.shape[0], e.shape[-1]  # [Rk, K, rows of the group, S] @ [Rk, K, S, H]: the product's own layout
      out = jnp.matmul(e.astype(dtype).reshape(Rk, K, -1, S), seg.v).reshape(Rk, K, R // Rk, T, G, H)
      to_rows = lambda x: x.transpose(0, 2, 3, 1, 4, 5).reshape(R, T, K, G, x.shape[-1])
      total, out = jnp.sum(e, axis=-1, keepdims=True), to_rows(out)
    parts.append((to_rows(m), to_rows(total), out.reshape(R, T, K, G, H).astype(jnp.float32)))
  top = functools.reduce(jnp.maximum, [m for m, _, _ in parts])
  weights = [jnp.exp(m - top) for m, _, _ in parts]
  total = sum(w * l for w, (_, l, _) in zip(weights, parts))
  return (sum(w * out for w, (_, _, out) in zip(weights, parts)) / total).astype(dtype)


def _per_row_values(p_RxSxKxG, v_RxSxKxH):
  """A per-row segment's values weighted by its (unnormalised) probabilities: [R, K, G, H]."""
  return jnp.sum(p_RxSxKxG[..., None] * v_RxSxKxH[:, :, :, None], axis=1)


def _softmax_concatenated(scores, segments, shape, dtype):
  """One softmax over every segment's scores (as attend_segments makes them) and the weighted values
  [R, T, K, G, H]. The scores are brought to one layout [Rc, K, R // Rc, T, G, S], Rc the most groups of any
  shared segment: only the small segments move (a per-row segment regrouped, one read by fewer groups
  split), so no score-sized transpose is made, and every product reads and writes its natural layout."""
  R, T, K, G, _ = shape
  Rc = max((seg.k.shape[0] for seg in segments if not seg.per_row), default=R)
  n = R // Rc

  def to_common(seg, x):  # -> [Rc, K, n, T, G, S]
    if seg.per_row:  # [R, S, K, G]
      return x.reshape(Rc, n, x.shape[1], K, G).transpose(0, 3, 1, 4, 2)[:, :, :, None]
    Rk, S = x.shape[0], x.shape[-1]
    return x.reshape(Rk, K, Rc // Rk, n, T, G, S).transpose(0, 2, 1, 3, 4, 5, 6).reshape(Rc, K, n, T, G, S)

  probs = jax.nn.softmax(jnp.concatenate([to_common(seg, s) for seg, s in zip(segments, scores)], axis=-1), axis=-1)
  out, start = 0.0, 0
  for seg, s in zip(segments, scores):
    S = s.shape[1] if seg.per_row else s.shape[-1]
    p, start = probs[..., start:start + S].astype(dtype), start + S
    if seg.per_row:  # [R, S, K, G] x [R, S, K, H]
      p = p[:, :, :, 0].transpose(0, 2, 4, 1, 3).reshape(R, S, K, G)
      o = _per_row_values(p, seg.v).reshape(Rc, n, K, T, G, -1).transpose(0, 2, 1, 3, 4, 5)
    else:  # [Rk, K, rows of the group, S] @ [Rk, K, S, H]
      Rk = seg.k.shape[0]
      p = p.reshape(Rk, Rc // Rk, K, n * T * G, S).transpose(0, 2, 1, 3, 4).reshape(Rk, K, -1, S)
      o = jnp.matmul(p, seg.v).reshape(Rk, K, Rc // Rk, n, T, G, -1).transpose(0, 2, 1, 3, 4, 5, 6)
    out = out + o.reshape(Rc, K, n, T, G, -1).astype(jnp.float32)
  return out.transpose(0, 2, 3, 1, 4, 5).reshape(R, T, K, G, -1).astype(dtype)


def as_keys(k_RxSxKxH):
  """Keys [R, S, K, H] as a segment stores them: [R, K, H, S]."""
  return k_RxSxKxH.transpose(0, 2, 3, 1)


def as_values(v_RxSxKxH):
  """Values [R, S, K, H] as a segment stores them: [R, K, S, H]."""
  return v_RxSxKxH.transpose(0, 2, 1, 3)


def by_layer(x, num_layers: int):
  """Per-layer arrays [L, ...] in the form the layers of a step read them: a tuple of L arrays when the
  layers are unrolled (model_lib.UNROLL_LAYERS: XLA copies a layer's slice of one stacked array before a
  product reads it, ~70 µs per layer for keys and again for values in a decoding step at bench_ranking's
  quick size), the stacked array when they are a scan (which slices it). Takes either form."""
  unrolled = num_layers <= model_lib.UNROLL_LAYERS
  if isinstance(x, tuple):
    return x if unrolled else jnp.stack(x)
  return tuple(x[i] for i in range(num_layers)) if unrolled else x


def set_layer(layers, index, value):
  """`by_layer` arrays with layer `index` (static when a tuple) replaced by value."""
  if isinstance(layers, tuple):
    return layers[:index] + (value.astype(layers[index].dtype),) + layers[index + 1:]
  return layers.at[index].set(value.astype(layers.dtype))


def map_layers(fn, *layers):
  """fn applied to each layer of `by_layer` arrays, in the same form."""
  if isinstance(layers[0], tuple):
    return tuple(fn(*xs) for xs in zip(*layers))
  return jax.vmap(fn)(*layers)


def prefix_segment(prefix: Prefix, layer):
  k = prefix.k[layer]
  return [] if k.shape[-1] == 0 else [Segment(k[None], prefix.v[layer][None])]


def over_layers(layer_fn, carry, base, adapters, num_layers: int):
  """carry = layer_fn(carry, index, layer, layer_adapters) over the layers: unrolled up to
  model_lib.UNROLL_LAYERS (static indices), else a scan (the cache in the carry, updated in place)."""
  layers, adapter_layers = base["layers"], adapters.get("layers", {})
  if num_layers <= model_lib.UNROLL_LAYERS:
    for index in range(num_layers):
      carry = layer_fn(carry, index, model_lib.take_layer(layers, index), model_lib.take_layer(adapter_layers, index))
    return carry
  body = lambda c, xs: (layer_fn(c, *xs), None)
  return jax.lax.scan(body, carry, (jnp.arange(num_layers), layers, adapter_layers))[0]


# ----------------------------------------------------------------------------------------------------
# Prefill and decode


def empty_prefix(cfg: model_lib.LlamaConfig) -> Prefix:
  keys = jnp.zeros((cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 0), cfg.compute_dtype)
  return Prefix(by_layer(keys, cfg.num_layers), by_layer(keys.transpose(0, 1, 3, 2), cfg.num_layers))


def _encode(base, adapters, tokens_BxT, positions_BxT, mask_BxTxT, prefix: Prefix, cfg, lcfg):
  """Run whole sequences [B, T] after the prefix: (final-normed last hidden state [B, D], keys [L, B, K, H, T]
  and values [L, B, K, T, H] of every position)."""
  B, T = tokens_BxT.shape
  cos, sin = kernels.rope_tables(positions_BxT, cfg)
  keys = jnp.zeros((cfg.num_layers, B, cfg.num_kv_heads, cfg.head_dim, T), cfg.compute_dtype)
  keys, values = by_layer(keys, cfg.num_layers), by_layer(keys.swapaxes(-1, -2), cfg.num_layers)

  def layer_fn(carry, index, layer, layer_adapters):
    x, k_all, v_all = carry

    def attention(q, k, v):
      k, v = as_keys(k), as_values(v)
      segments = prefix_segment(prefix, index) + [Segment(k, v, mask_BxTxT[:, None])]
      return attend_segments(q, segments, cfg.head_dim ** -0.5), (k, v)

    x, (k, v) = model_lib.decoder_layer(x, layer, layer_adapters, attention, cos, sin, cfg, lcfg)
    return x, set_layer(k_all, index, k), set_layer(v_all, index, v)

  x, k_all, v_all = over_layers(layer_fn, (model_lib.embed(base, tokens_BxT, cfg), keys, values), base, adapters,
                                cfg.num_layers)
  return model_lib.final_norm(base, x[:, -1], cfg), k_all, v_all


@functools.partial(jax.jit, static_argnames=("cfg", "lcfg"))
def encode_prefix(base, adapters, prefix_tokens, *, cfg: model_lib.LlamaConfig, lcfg: lora_lib.LoraConfig) -> Prefix:
  """The keys and values of prefix tokens [P] at positions 0..P-1 (computed once, read by every batch)."""
  P = prefix_tokens.shape[0]
  if P == 0:
    return empty_prefix(cfg)
  positions = jnp.arange(P, dtype=jnp.int32)[None]
  causal = jnp.tril(jnp.ones((P, P), bool))[None]
  _, k, v = _encode(base, adapters, prefix_tokens[None], positions, causal, empty_prefix(cfg), cfg, lcfg)
  return Prefix(map_layers(lambda x: x[0], k), map_layers(lambda x: x[0], v))  # [L, K, H, P]


def split_prefix(base, adapters, cfg, lcfg, prompts, prefix_length: int | None = None):
  """(encoded prefix, the prompts without it): the first `prefix_length` tokens (default: all the prompts
  share, `common_prefix_length`) encoded once with these adapters."""
  shared = common_prefix_length(prompts) if prefix_length is None else int(prefix_length)
  head = np.asarray(prompts[0][:shared], np.int32) if len(prompts) else np.zeros(0, np.int32)
  for row, tokens in enumerate(prompts):
    if len(tokens) <= shared or not np.array_equal(np.asarray(tokens[:shared], np.int32), head):
      raise ValueError(f"prompt {row} does not start with the {shared} shared prefix tokens and one more")
  return encode_prefix(base, adapters, jnp.asarray(head), cfg=cfg, lcfg=lcfg), [t[shared:] for t in prompts]


def prefill(base, adapters, prompt, attention_mask, cfg, lcfg, max_new_tokens: int, num_beams: int = 1,
            prefix: Prefix | None = None):
  """Encode left-padded prompts [B, Tp] after the prefix; (last logits [B, V], cache for `num_beams` beams
  of `max_new_tokens` steps, positions of the first new token [B])."""
  L = cfg.num_layers
  prefix = empty_prefix(cfg) if prefix is None else Prefix(by_layer(prefix.k, L), by_layer(prefix.v, L))
  B, Tp = prompt.shape
  valid = attention_mask.astype(bool)
  P = prefix.k[0].shape[-1]
  positions = (P + jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)).astype(jnp.int32)
  mask = valid[:, None, :] & jnp.tril(jnp.ones((Tp, Tp), bool))[None]
  h, k, v = _encode(base, adapters, prompt, positions, mask, prefix, cfg, lcfg)
  K, H, N = cfg.num_kv_heads, cfg.head_dim, num_beams
  zeros = lambda *shape: by_layer(jnp.zeros(shape, cfg.compute_dtype), L)
  M = max_new_tokens
  history = jnp.broadcast_to(jnp.eye(N, dtype=bool)[None, :, None, :], (B, N, M, N))
  cache = Cache(prefix, k, v, valid, zeros(L, B, K, H, M * N), zeros(L, B, K, M * N, H),
                zeros(L, B, K, H, N), zeros(L, B, K, N, H), history, jnp.zeros((), jnp.int32))
  return model_lib.lm_logits(base, h, cfg), cache, (P + jnp.sum(valid, axis=-1)).astype(jnp.int32)


def decode(base, adapters, tokens_R, positions_R, cache: Cache, cfg, lcfg):
  """One new token per beam (rows R = B * N, beam-major within a prompt) through the model with the
  cache; (logits [R, V], the cache after step `cache.index`).

  The previous step's keys and values (`last_k`, `last_v`) are written into the cache first, in one
  update that nothing read before (so in place); a beam then attends to the earlier steps in the cache
  and to its own new key and value, which become the next call's `last_k`, `last_v`.
  """
  B, N, M, _ = cache.history.shape
  step = jnp.maximum(cache.index - 1, 0)  # at step 0, zeros into a slot not yet read
  k_cache = map_layers(lambda k, last: jax.lax.dynamic_update_slice(k, last, (0, 0, 0, step * N)), cache.k,
                       cache.last_k)
  v_cache = map_layers(lambda v, last: jax.lax.dynamic_update_slice(v, last, (0, 0, step * N, 0)), cache.v,
                       cache.last_v)
  cos, sin = kernels.rope_tables(positions_R[:, None], cfg)
  prompt_mask = cache.prompt_valid[:, None, None, :]  # [B, 1, 1, Tp]: every beam of a prompt reads it
  # Beam n reads its steps t < the current one from their slots (the current one is its own new key).
  generated_mask = (cache.history & (jnp.arange(M) < cache.index)[:, None]).reshape(B, N, 1, M * N)
  K, H = cfg.num_kv_heads, cfg.head_dim

  def layer_fn(carry, index, layer, layer_adapters):
    x, new_k, new_v = carry

    def attention(q, k, v):
      segments = prefix_segment(cache.prefix, index) + [
          Segment(cache.prompt_k[index], cache.prompt_v[index], prompt_mask),
          Segment(k_cache[index], v_cache[index], generated_mask),
          Segment(k, v, per_row=True)]
      return attend_segments(q, segments, cfg.head_dim ** -0.5), (k, v)

    x, (k, v) = model_lib.decoder_layer(x, layer, layer_adapters, attention, cos, sin, cfg, lcfg)
    k = k[:, 0].reshape(B, N, K, H).transpose(0, 2, 3, 1)  # [B, K, H, N]
    v = v[:, 0].reshape(B, N, K, H).transpose(0, 2, 1, 3)  # [B, K, N, H]
    return x, set_layer(new_k, index, k), set_layer(new_v, index, v)

  x = model_lib.embed(base, tokens_R[:, None], cfg)
  x, new_k, new_v = over_layers(layer_fn, (x, map_layers(jnp.zeros_like, cache.last_k),
                                           map_layers(jnp.zeros_like, cache.last_v)), base, adapters, cfg.num_layers)
  logits = model_lib.lm_logits(base, model_lib.final_norm(base, x[:, -1], cfg), cfg)
  return logits, cache._replace(k=k_cache, v=v_cache, last_k=new_k, last_v=new_v, index=cache.index + 1)


def _reorder(cache: Cache, src_BxN) -> Cache:
  """The cache after beams were replaced by copies of beams src (within each prompt): only the
  histories move (a boolean [B, N, M, N]); the new step will be written in each beam's own slot."""
  _, N, M, _ = cache.history.shape
  history = jnp.take_along_axis(cache.history, src_BxN[:, :, None, None], axis=1)
  step = (jnp.arange(M) == cache.index)[:, None]
  return cache._replace(history=jnp.where(step, jnp.eye(N, dtype=bool)[None, :, None, :], history))


@functools.partial(jax.jit, static_argnames=("cfg", "lcfg", "max_new_tokens", "eos_id", "pad_id"))
def greedy(base, adapters, prompt, attention_mask, *, cfg: model_lib.LlamaConfig, lcfg: lora_lib.LoraConfig,
           max_new_tokens: int, eos_id: int, pad_id: int, prefix: Prefix | None = None) -> Output:
  """Greedy decoding (transformers' `generate(do_sample=False, num_beams=1)`)."""
  B = prompt.shape[0]
  logits, cache, next_pos = prefill(base, adapters, prompt, attention_mask, cfg, lcfg, max_new_tokens, 1, prefix)

  def cond(state):
    step, _, _, finished, _, _, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(finished)

  def body(state):
    step, logits, cache, finished, tokens, lengths, scores, pos = state
    logp = jax.nn.log_softmax(logits, axis=-1)
    token = jnp.where(finished, pad_id, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    scores = scores + jnp.where(finished, 0.0, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0])
    tokens = tokens.at[:, step].set(token)
    lengths = lengths + (~finished).astype(jnp.int32)
    finished = finished | (token == eos_id)
    logits, cache = decode(base, adapters, token, pos, cache, cfg, lcfg)
    return step + 1, logits, cache, finished, tokens, lengths, scores, pos + 1

  tokens = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
  zeros = jnp.zeros((B,), jnp.int32)
  state = (jnp.int32(0), logits, cache, jnp.zeros((B,), bool), tokens, zeros, zeros.astype(jnp.float32), next_pos)
  _, _, _, _, tokens, lengths, scores, _ = jax.lax.while_loop(cond, body, state)
  return Output(tokens, lengths, scores)


class _BeamState(NamedTuple):
  cur: jax.Array  # generated tokens so far (scalar)
  logits: jax.Array  # [B*N, V] next-token logits of the running beams
  cache: Cache
  running: jax.Array  # [B, N, M] running sequences (generated part only)
  running_scores: jax.Array  # [B, N]
  finished: jax.Array  # [B, N, M] best finished hypotheses
  finished_scores: jax.Array  # [B, N]
  finished_lengths: jax.Array  # [B, N] generated tokens of each finished hypothesis
  is_finished: jax.Array  # [B, N] bool
  improvable: jax.Array  # [B, 1] bool: the early-stop heuristic is not yet satisfied
  positions: jax.Array  # [B*N] position of the next token
  done: jax.Array  # bool
  nodes: jax.Array  # [B*N] trie node of each running beam (constrained search only)


def _gather(x, idx):
  """x [B, K, ...] gathered along axis 1 with idx [B, J]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "lcfg", "max_new_tokens", "num_beams", "eos_id", "pad_id",
                                             "length_penalty"))
def beam_search(base, adapters, prompt, attention_mask, *, cfg: model_lib.LlamaConfig,
                lcfg: lora_lib.LoraConfig, max_new_tokens: int, num_beams: int, eos_id: int, pad_id: int,
                length_penalty: float = 1.0, trie: trie_lib.Trie | None = None,
                prefix: Prefix | None = None) -> Output:
  """Beam search as transformers' `generate(num_beams=N, do_sample=False, early_stopping=False)`.

  `prefix` (from `encode_prefix`): tokens every prompt starts with, left out of `prompt`. With a `trie`,
  each beam may only continue a sequence of the trie (as transformers' `prefix_allowed_tokens_fn`: other
  tokens' log-probs become -inf, without renormalising).
  """
  B, Tp = prompt.shape
  N, M = num_beams, max_new_tokens
  logits, cache, next_pos = prefill(base, adapters, prompt, attention_mask, cfg, lcfg, M, N, prefix)
  expand = lambda x: jnp.repeat(x, N, axis=0)
  empty = jnp.full((B, N, M), pad_id, jnp.int32)
  state = _BeamState(
      cur=jnp.int32(0), logits=expand(logits), cache=cache, running=empty,
      running_scores=jnp.concatenate([jnp.zeros((B, 1)), jnp.full((B, N - 1), NEG)], axis=1),
      finished=empty, finished_scores=jnp.full((B, N), NEG), finished_lengths=jnp.zeros((B, N), jnp.int32),
      is_finished=jnp.zeros((B, N), bool),
      improvable=jnp.ones((B, 1), bool), positions=expand(next_pos), done=jnp.bool_(False),
      nodes=jnp.zeros((B * N,), jnp.int32))
  step = functools.partial(_beam_step, base=base, adapters=adapters, cfg=cfg, lcfg=lcfg, eos_id=eos_id,
                           length_penalty=length_penalty, trie=trie)
  state = jax.lax.while_loop(lambda s: ~s.done, step, state)
  return Output(state.finished[:, 0], state.finished_lengths[:, 0], state.finished_scores[:, 0])


def _beam_step(s: _BeamState, *, base, adapters, cfg, lcfg, eos_id, length_penalty, trie) -> _BeamState:
  B, N, M = s.running.shape
  V = s.logits.shape[-1]
  K = 2 * N  # candidates kept per step: max(2, 1 + number of EOS ids) * beams
  logp = jax.nn.log_softmax(s.logits, axis=-1)
  if trie is not None:
    logp = jnp.where(trie_lib.allowed_tokens(trie, s.nodes, V), logp, -jnp.inf)
  logp = logp.reshape(B, N, V) + s.running_scores[:, :, None]
  top_logp, top_idx = jax.lax.top_k(logp.reshape(B, N * V), K)
  src_beam, token = top_idx // V, (top_idx % V).astype(jnp.int32)
  candidates = _gather(s.running, src_beam).at[:, :, s.cur].set(token)
  hits = (token == eos_id) | (s.cur + 1 >= M)

  # The best non-finished candidates keep running.
  run_logp = top_logp + hits.astype(jnp.float32) * NEG
  keep = jax.lax.top_k(run_logp, N)[1]
  running, running_scores, running_src = _gather(candidates, keep), _gather(run_logp, keep), _gather(src_beam, keep)

  # Finished candidates among the top N enter the finished set if they beat it.
  just_finished = hits & (jnp.arange(K) < N)[None, :]
  fin_scores = top_logp / ((s.cur + 1).astype(jnp.float32) ** length_penalty)
  fin_scores = fin_scores + (~s.improvable).astype(jnp.float32) * NEG + (~just_finished).astype(jnp.float32) * NEG
  merged_scores = jnp.concatenate([s.finished_scores, fin_scores], axis=1)
  best = jax.lax.top_k(merged_scores, N)[1]
  finished = _gather(jnp.concatenate([s.finished, candidates], axis=1), best)
  finished_scores = _gather(merged_scores, best)
  finished_lengths = _gather(jnp.concatenate([s.finished_lengths, jnp.full((B, K), s.cur + 1)], axis=1), best)
  is_finished = _gather(jnp.concatenate([s.is_finished, just_finished], axis=1), best)

  # The surviving beams' histories (the cache itself is not moved) and their next-token logits; all beams
  # of a prompt are at the same position.
  cache = _reorder(s.cache, running_src)
  new_tokens = running[:, :, s.cur].reshape(-1)
  flat_src = (running_src + jnp.arange(B)[:, None] * N).reshape(-1)
  nodes = s.nodes if trie is None else trie_lib.advance(trie, s.nodes[flat_src], new_tokens)
  logits, cache = decode(base, adapters, new_tokens, s.positions, cache, cfg, lcfg)

  cur = s.cur + 1
  best_running = running_scores[:, :1] / (cur.astype(jnp.float32) ** length_penalty)
  worst_finished = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), NEG)
  improvable = s.improvable & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
  done = ~jnp.any(improvable) | jnp.all(hits) | (cur >= M)
  return _BeamState(cur, logits, cache, running, running_scores, finished, finished_scores, finished_lengths,
                    is_finished, improvable, s.positions + 1, done, nodes)
