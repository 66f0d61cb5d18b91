"""Jitted generation with a KV cache: greedy and beam search, token for token as transformers' generate.

Prompts are a left-padded batch [B, Tp] with an attention mask. The cache holds keys and values of every
layer for Tp + max_new_tokens positions; all rows write at the same index (left padding), and a key is
visible when it holds a real token at or before the query. Positions follow transformers:
cumsum(attention_mask) - 1. Beam search reproduces transformers' vectorised `_beam_search` (top 2*beams
candidates, finished hypotheses scored by sum_logprobs / generated_length ** length_penalty, the
early-stop heuristic of `early_stopping=False`), including its -1e9 float32 sentinels.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fellrec_jax.model import kernels
from fellrec_jax.model import lora as lora_lib
from fellrec_jax.model import llama as model_lib
from fellrec_jax.model import trie as trie_lib

NEG = -1.0e9  # transformers' sentinel for "not selectable"


class Cache(NamedTuple):
  k: jax.Array  # [L, B, S, K, H]
  v: jax.Array  # [L, B, S, K, H]
  key_valid: jax.Array  # [B, S] bool: the position holds a real token
  index: jax.Array  # int32 scalar: the next position to write


class Output(NamedTuple):
  tokens: jax.Array  # [B, max_new_tokens] generated tokens (pad after EOS)
  lengths: jax.Array  # [B] generated tokens up to and including EOS
  scores: jax.Array  # [B] transformers' sequence score (beam search) or sum of log-probs (greedy)


def init_cache(cfg: model_lib.LlamaConfig, batch: int, length: int) -> Cache:
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
  zeros = jnp.zeros(shape, cfg.compute_dtype)
  return Cache(zeros, zeros, jnp.zeros((batch, length), bool), jnp.zeros((), jnp.int32))


def decode(base, adapters, tokens, positions, new_valid, cache: Cache, cfg, lcfg):
  """Run new tokens [B, T] through the model with the cache; (logits of the last token [B, V], cache).

  Each layer writes the new tokens' keys/values at `cache.index`, then attends over the whole cache.
  """
  T = tokens.shape[1]
  key_valid = jax.lax.dynamic_update_slice(cache.key_valid, new_valid, (0, cache.index))
  query_index = cache.index + jnp.arange(T)
  causal = jnp.arange(key_valid.shape[1])[None, :] <= query_index[:, None]
  mask = key_valid[:, None, :] & causal[None]
  cos, sin = kernels.rope_tables(positions, cfg)

  def body(x, xs):
    layer, layer_adapters, k_cache, v_cache = xs

    def cached_attention(q, k, v):
      k_all = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache.index, 0, 0))
      v_all = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache.index, 0, 0))
      return kernels.attend(q, [(k_all, v_all, mask, False)], cfg.head_dim ** -0.5), (k_all, v_all)

    return model_lib.decoder_layer(x, layer, layer_adapters, cached_attention, cos, sin, cfg, lcfg)

  x = model_lib.embed(base, tokens, cfg)
  x, (k, v) = jax.lax.scan(body, x, (base["layers"], adapters.get("layers", {}), cache.k, cache.v))
  h = model_lib.final_norm(base, x[:, -1], cfg)
  return model_lib.lm_logits(base, h, cfg), Cache(k, v, key_valid, cache.index + T)


def prefill(base, adapters, prompt, attention_mask, cfg, lcfg, max_new_tokens: int):
  """Encode left-padded prompts; (last logits [B, V], cache, next positions [B])."""
  B, Tp = prompt.shape
  mask = attention_mask.astype(bool)
  positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)
  cache = init_cache(cfg, B, Tp + max_new_tokens)
  logits, cache = decode(base, adapters, prompt, positions, mask, cache, cfg, lcfg)
  return logits, cache, jnp.sum(mask, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "lcfg", "max_new_tokens", "eos_id", "pad_id"))
def greedy(base, adapters, prompt, attention_mask, *, cfg: model_lib.LlamaConfig, lcfg: lora_lib.LoraConfig,
           max_new_tokens: int, eos_id: int, pad_id: int) -> Output:
  """Greedy decoding (transformers' `generate(do_sample=False, num_beams=1)`)."""
  B = prompt.shape[0]
  logits, cache, next_pos = prefill(base, adapters, prompt, attention_mask, cfg, lcfg, max_new_tokens)

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
    logits, cache = decode(base, adapters, token[:, None], pos[:, None], jnp.ones((B, 1), bool), cache, cfg,
                           lcfg)
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
                length_penalty: float = 1.0, trie: trie_lib.Trie | None = None) -> Output:
  """Beam search as transformers' `generate(num_beams=N, do_sample=False, early_stopping=False)`.

  With a `trie`, each beam may only continue a sequence of the trie (as transformers'
  `prefix_allowed_tokens_fn`: other tokens' log-probs become -inf, without renormalising).
  """
  B, Tp = prompt.shape
  N, M = num_beams, max_new_tokens
  logits, cache, next_pos = prefill(base, adapters, prompt, attention_mask, cfg, lcfg, M)
  expand = lambda x: jnp.repeat(x, N, axis=0)
  cache = Cache(jnp.repeat(cache.k, N, axis=1), jnp.repeat(cache.v, N, axis=1), expand(cache.key_valid),
                cache.index)
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

  # Reorder the cache to the surviving beams and compute their next-token logits.
  flat_src = (running_src + jnp.arange(B)[:, None] * N).reshape(-1)
  cache = Cache(s.cache.k[:, flat_src], s.cache.v[:, flat_src], s.cache.key_valid[flat_src], s.cache.index)
  positions = s.positions[flat_src]
  new_tokens = running[:, :, s.cur].reshape(-1, 1)
  nodes = s.nodes if trie is None else trie_lib.advance(trie, s.nodes[flat_src], new_tokens[:, 0])
  logits, cache = decode(base, adapters, new_tokens, positions[:, None], jnp.ones((B * N, 1), bool), cache,
                         cfg, lcfg)

  cur = s.cur + 1
  best_running = running_scores[:, :1] / (cur.astype(jnp.float32) ** length_penalty)
  worst_finished = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True), NEG)
  improvable = s.improvable & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
  done = ~jnp.any(improvable) | jnp.all(hits) | (cur >= M)
  return _BeamState(cur, logits, cache, running, running_scores, finished, finished_scores, finished_lengths,
                    is_finished, improvable, positions + 1, done, nodes)
