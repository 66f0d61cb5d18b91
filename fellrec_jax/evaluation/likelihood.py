"""Catalog likelihood ranking: score every catalog title by its log-probability as the response to a prompt.

score(prompt, item) = sum of log p(token | prompt, earlier tokens) over the item's response tokens (the
quoted title as the model writes it, then EOS; recommend.response_tokens). Each prompt is encoded once
(generation.prefill); titles are then run in blocks against the prompt's cached keys and values, which
every title of the block reads (broadcast, never recomputed or copied per title). A running top-k keeps
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


def _attend_prompt_and_title(q_PxBxTxKxGxH, prompt_k_PxSxKxH, prompt_v_PxSxKxH, prompt_valid_PxS, k_PxBxTxKxH,
                             v_PxBxTxKxH, causal_BxTxT, scale: float):
  """Attention of title tokens over their prompt's cache (shared by the B titles) and their own tokens.

  The prompt part is one matmul per (prompt, kv head) over all the titles' queries, which is what makes
  sharing the cache cheap. Scores in the compute dtype, softmax statistics in float32 (as kernels.attend);
  the normalisation is applied after the value product.
  """
  P, B, T, K, G, H = q_PxBxTxKxGxH.shape
  dtype = q_PxBxTxKxGxH.dtype
  q_PxKxQxH = q_PxBxTxKxGxH.transpose(0, 3, 1, 2, 4, 5).reshape(P, K, B * T * G, H)  # Q = (b, t, g)
  s_prompt = jnp.einsum("pkqh,pskh->pkqs", q_PxKxQxH, prompt_k_PxSxKxH).astype(jnp.float32) * scale
  s_prompt = jnp.where(prompt_valid_PxS[:, None, None, :], s_prompt, -jnp.inf)
  s_title = jnp.einsum("pbtkgh,pbskh->pkbtgs", q_PxBxTxKxGxH, k_PxBxTxKxH).astype(jnp.float32) * scale
  s_title = jnp.where(causal_BxTxT[None, None, :, :, None, :], s_title, -jnp.inf).reshape(P, K, B * T * G, T)
  # Every query sees at least its own token, so the max is finite.
  top = jnp.maximum(s_prompt.max(-1, keepdims=True), s_title.max(-1, keepdims=True))
  e_prompt, e_title = jnp.exp(s_prompt - top), jnp.exp(s_title - top)
  total = e_prompt.sum(-1, keepdims=True) + e_title.sum(-1, keepdims=True)
  out = jnp.einsum("pkqs,pskh->pkqh", e_prompt.astype(dtype), prompt_v_PxSxKxH)
  out = out + jnp.einsum("pkbtgs,pbskh->pkbtgh", e_title.astype(dtype).reshape(P, K, B, T, G, T),
                         v_PxBxTxKxH).reshape(P, K, B * T * G, H)
  out = (out.astype(jnp.float32) / total).astype(dtype)
  return out.reshape(P, K, B, T, G, H).transpose(0, 2, 3, 1, 4, 5)


def title_logprobs(base, adapters, cache: generation.Cache, next_pos_P, first_logp_PxV, titles_BxT, lengths_B,
                   cfg, lcfg):
  """float32 [P, B]: the summed log-probability of each (right-padded) title after each cached prompt.

  `cache` holds the prompts' keys/values [L, P, S, K, H]; `first_logp_PxV` their next-token log-probs
  (which score each title's first token); `next_pos_P` the position of a title's first token.
  """
  B, T = titles_BxT.shape
  positions_PxT = next_pos_P[:, None] + jnp.arange(T)[None]
  cos, sin = kernels.rope_tables(positions_PxT, cfg)
  cos, sin = cos[:, None], sin[:, None]  # [P, 1, T, Dh]: the same rotation for every title of a prompt
  valid_BxT = jnp.arange(T)[None] < lengths_B[:, None]
  causal_BxTxT = jnp.tril(jnp.ones((T, T), bool))[None] & valid_BxT[:, None, :]
  x = model_lib.embed(base, titles_BxT, cfg)
  x = jnp.broadcast_to(x[None], (next_pos_P.shape[0], *x.shape))

  def body(x, xs):
    layer, layer_adapters, prompt_k, prompt_v = xs
    attention = lambda q, k, v: (_attend_prompt_and_title(q, prompt_k, prompt_v, cache.key_valid, k, v,
                                                          causal_BxTxT, cfg.head_dim ** -0.5), None)
    return model_lib.decoder_layer(x, layer, layer_adapters, attention, cos, sin, cfg, lcfg)

  x, _ = jax.lax.scan(body, x, (base["layers"], adapters.get("layers", {}), cache.k, cache.v))
  # Position t predicts token t+1; the last position predicts nothing we score.
  h = model_lib.final_norm(base, x[:, :, :-1], cfg)
  logits_PxBxTxV = model_lib.lm_logits(base, h, cfg)
  target = jnp.broadcast_to(titles_BxT[None, :, 1:, None], (*logits_PxBxTxV.shape[:-1], 1))
  later = jnp.take_along_axis(logits_PxBxTxV, target, axis=-1)[..., 0] - jax.nn.logsumexp(logits_PxBxTxV, axis=-1)
  later = jnp.sum(jnp.where(valid_BxT[None, :, 1:], later, 0.0), axis=-1)
  return first_logp_PxV[:, titles_BxT[:, 0]] + later


@functools.partial(jax.jit, static_argnames=("cfg", "lcfg"))
def _prefill(base, adapters, prompt_PxT, mask_PxT, *, cfg, lcfg):
  logits, cache, next_pos = generation.prefill(base, adapters, prompt_PxT, mask_PxT, cfg, lcfg, 0)
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
                       prompt_batch: int = 8, title_tokens: int = 512,
                       pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(item ids int64 [N, k], their log-probabilities float32 [N, k]), best first, history excluded.

  prompts: token lists ending with "### Response:\\n" (BOS, no EOS); responses: item i's response tokens
  (EOS included); exclude: per prompt, items never to rank. Prompts go in batches of `prompt_batch`, all
  left-padded to one length; titles are sorted by length and cut into blocks of about `title_tokens`
  padded tokens (memory: prompt_batch x title_tokens x vocab logits), so shapes, and compilations, stay
  few. Ties go to the shorter title.
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

  prompt_order = np.argsort([len(p) for p in prompts], kind="stable")
  length = grounding.padded_length(max(len(p) for p in prompts))
  ranked = np.zeros((len(prompts), k), np.int64)
  scores = np.zeros((len(prompts), k), np.float32)
  for start in range(0, len(prompts), prompt_batch):
    index = prompt_order[start:start + prompt_batch]
    ids, mask = grounding.left_pad([prompts[i] for i in index], length, prompt_batch, pad_id)
    first_logp, cache, next_pos = _prefill(base, adapters, ids, mask, cfg=cfg, lcfg=lcfg)
    exclude_PxH = np.full((prompt_batch, exclude_NxH.shape[1]), topk_lib.NO_ITEM, np.int32)
    exclude_PxH[:len(index)] = exclude_NxH[index]
    best = topk_lib.init_topk(prompt_batch, k)
    for titles, title_lengths, title_ids, offset in blocks:
      best = _score_block(best, base, adapters, cache, next_pos, first_logp, titles, title_lengths, title_ids,
                          offset, exclude_PxH, cfg=cfg, lcfg=lcfg, k=k)
    ranked[index] = topk_lib.finalize(*best)[:len(index)]
    scores[index] = np.asarray(best[0])[:len(index)]
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
