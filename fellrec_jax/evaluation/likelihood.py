"""Catalog likelihood ranking: score every catalog title by its log-probability as the response to a prompt.

score(prompt, item) = sum of log p(token | prompt, earlier tokens) over the item's response tokens (the
quoted title as the model writes it, then EOS; recommend.response_tokens). Each prompt is encoded once
(generation.prefill, the prefix all prompts share once); titles are then run in blocks against the
prompt's cached keys and values, which every title of the block reads (never recomputed or copied per
title). A running top-k keeps
memory at [prompts, title block] scores for any catalog size. Unlike grounding, this ranks with the
client's adapters: it asks the fine-tuned model directly how likely each item is.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fellrec_jax.model import generation
from fellrec_jax.evaluation import grounding
from fellrec_jax.model import kernels
from fellrec_jax.model import llama as model_lib
from fellrec_jax.evaluation import topk as topk_lib


def title_logprobs(base, adapters, cache: generation.Cache, next_pos_P, first_logp_PxV, titles_BxT, lengths_B,
                   cfg, lcfg):
  """float32 [P, B]: the summed log-probability of each (right-padded) title after each cached prompt.

  `cache` holds the prompts' keys/values (generation.prefill: the shared prefix once, each prompt's own
  tokens [L, P, S, K, H]); `first_logp_PxV` their next-token log-probs (which score each title's first
  token); `next_pos_P` the position of a title's first token. Rows are (prompt, title) pairs: every title of
  a prompt reads that prompt's keys (one matmul per prompt and kv head over all its titles' queries).
  """
  B, T = titles_BxT.shape
  P = next_pos_P.shape[0]
  positions_RxT = jnp.repeat(next_pos_P[:, None] + jnp.arange(T)[None], B, axis=0)
  cos, sin = kernels.rope_tables(positions_RxT, cfg)
  valid_BxT = jnp.arange(T)[None] < lengths_B[:, None]
  causal_BxTxT = jnp.tril(jnp.ones((T, T), bool))[None] & valid_BxT[:, None, :]
  own_mask = jnp.broadcast_to(causal_BxTxT[None], (P, B, T, T)).reshape(P * B, 1, T, T)
  prompt_mask = cache.prompt_valid[:, None, None, :]
  x = model_lib.embed(base, titles_BxT, cfg)
  x = jnp.broadcast_to(x[None], (P, *x.shape)).reshape(P * B, T, -1)

  def layer_fn(x, index, layer, layer_adapters):
    def attention(q, k, v):
      segments = generation.prefix_segment(cache.prefix, index) + [
          (cache.prompt_k[index], cache.prompt_v[index], prompt_mask), (k, v, own_mask)]
      return generation.attend_segments(q, segments, cfg.head_dim ** -0.5), None

    return model_lib.decoder_layer(x, layer, layer_adapters, attention, cos, sin, cfg, lcfg)[0]

  x = generation.over_layers(layer_fn, x, base, adapters, cfg.num_layers)
  # Position t predicts token t+1; the last position predicts nothing we score.
  h = model_lib.final_norm(base, x[:, :-1], cfg)
  logits_PxBxTxV = model_lib.lm_logits(base, h, cfg).reshape(P, B, T - 1, -1)
  target = jnp.broadcast_to(titles_BxT[None, :, 1:, None], (*logits_PxBxTxV.shape[:-1], 1))
  later = jnp.take_along_axis(logits_PxBxTxV, target, axis=-1)[..., 0] - jax.nn.logsumexp(logits_PxBxTxV, axis=-1)
  later = jnp.sum(jnp.where(valid_BxT[None, :, 1:], later, 0.0), axis=-1)
  return first_logp_PxV[:, titles_BxT[:, 0]] + later


@functools.partial(jax.jit, static_argnames=("cfg", "lcfg"))
def _prefill(base, adapters, prompt_PxT, mask_PxT, prefix, *, cfg, lcfg):
  logits, cache, next_pos = generation.prefill(base, adapters, prompt_PxT, mask_PxT, cfg, lcfg, 0, 1, prefix)
  return jax.nn.log_softmax(logits, axis=-1), cache, next_pos


@functools.partial(jax.jit, static_argnames=("cfg", "lcfg", "k"))
def _score_block(best, base, adapters, cache, next_pos_P, first_logp_PxV, titles_BxT, lengths_B, ids_B, offset,
                 exclude_PxH, *, cfg, lcfg, k: int):
  """Merge one block of titles into the running top-k of each prompt."""
  scores_PxB = title_logprobs(base, adapters, cache, next_pos_P, first_logp_PxV, titles_BxT, lengths_B, cfg, lcfg)
  banned_PxB = topk_lib.excluded_in_block(exclude_PxH, offset, ids_B.shape[0]) | (ids_B < 0)[None]
  scores_PxB = jnp.where(banned_PxB, -jnp.inf, scores_PxB)
  return topk_lib.merge_topk(*best, scores_PxB, jnp.broadcast_to(ids_B, scores_PxB.shape), k)


def rank_by_likelihood(base, adapters, cfg, lcfg, prompts: Sequence[Sequence[int]],
                       responses: Sequence[Sequence[int]], exclude: Sequence[Sequence[int]], k: int, *,
                       prompt_batch: int = 8, title_tokens: int = 512, pad_id: int = 0,
                       prefix_length: int | None = None, progress=None) -> tuple[np.ndarray, np.ndarray]:
  """(item ids int64 [N, k], their log-probabilities float32 [N, k]), best first, history excluded.

  prompts: token lists ending with "### Response:\\n" (BOS, no EOS); responses: item i's response tokens
  (EOS included); exclude: per prompt, items never to rank. The prompts' first `prefix_length` tokens
  (default: all they share, generation.common_prefix_length) are encoded once; the rest go in batches of
  `prompt_batch` sorted by length, all left-padded to one length; titles are sorted by length and cut into
  blocks of about `title_tokens` padded tokens (memory: prompt_batch x title_tokens x vocab logits), so
  shapes, and compilations, stay few. Ties go to the shorter title. `progress(n)` is called after each
  batch of n prompts.
  """
  if len(exclude) != len(prompts):
    raise ValueError(f"{len(prompts)} prompts but {len(exclude)} exclusion lists")
  lengths = np.array([len(r) for r in responses])
  order = np.argsort(lengths, kind="stable")
  # Blocks index titles by their place in `order`, so a user's history maps to those places.
  place = np.empty(len(order), np.int64)
  place[order] = np.arange(len(order))
  exclude_NxH = topk_lib.pad_item_lists([place[np.asarray(items, np.int64)] for items in exclude])
  blocks = [_title_block(responses, order[start:stop], width, rows, pad_id) + (start,)
            for start, stop, width, rows in _title_blocks(lengths[order], title_tokens)]

  prefix, suffixes = generation.split_prefix(base, adapters, cfg, lcfg, prompts, prefix_length)
  prompt_order = np.argsort([len(p) for p in suffixes], kind="stable")
  length = grounding.padded_length(max(len(p) for p in suffixes))
  ranked = np.zeros((len(prompts), k), np.int64)
  scores = np.zeros((len(prompts), k), np.float32)
  for start in range(0, len(prompts), prompt_batch):
    index = prompt_order[start:start + prompt_batch]
    ids, mask = grounding.left_pad([suffixes[i] for i in index], length, prompt_batch, pad_id)
    first_logp, cache, next_pos = _prefill(base, adapters, ids, mask, prefix, cfg=cfg, lcfg=lcfg)
    exclude_PxH = np.full((prompt_batch, exclude_NxH.shape[1]), topk_lib.NO_ITEM, np.int32)
    exclude_PxH[:len(index)] = exclude_NxH[index]
    best = topk_lib.init_topk(prompt_batch, k)
    for titles, title_lengths, title_ids, offset in blocks:
      best = _score_block(best, base, adapters, cache, next_pos, first_logp, titles, title_lengths, title_ids,
                          offset, exclude_PxH, cfg=cfg, lcfg=lcfg, k=k)
    ranked[index] = topk_lib.finalize(*best)[:len(index)]
    scores[index] = np.asarray(best[0])[:len(index)]
    if progress is not None:
      progress(len(index))
  return ranked, scores


def _title_blocks(sorted_lengths: np.ndarray, title_tokens: int) -> list[tuple[int, int, int, int]]:
  """(start, stop, width, rows) of consecutive blocks of length-sorted titles: a block holds titles of one
  `padded_length` bucket, at most `rows` of them, rows a power of two with rows * width <= title_tokens."""
  blocks, start = [], 0
  while start < len(sorted_lengths):
    width = grounding.padded_length(int(sorted_lengths[start]), minimum=4)
    rows = 1 << max(0, (title_tokens // width).bit_length() - 1)
    stop = min(start + rows, int(np.searchsorted(sorted_lengths, width, side="right")))
    blocks.append((start, stop, width, rows))
    start = stop
  return blocks


def _title_block(responses, items: np.ndarray, width: int, rows: int, pad_id: int):
  """(tokens [rows, width], lengths [rows], item ids [rows] with -1 on filler rows)."""
  titles = np.full((rows, width), pad_id, np.int32)
  lengths = np.ones(rows, np.int32)
  ids = np.full(rows, -1, np.int32)
  for row, item in enumerate(items):
    titles[row, :len(responses[item])] = responses[item]
    lengths[row] = len(responses[item])
    ids[row] = item
  return titles, lengths, ids
