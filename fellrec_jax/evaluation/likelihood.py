"""Catalog likelihood ranking: score every catalog title by its log-probability as the response to a prompt.

score(prompt, item) = sum of log p(token | prompt, earlier tokens) over the item's response tokens (the
quoted title as the model writes it, then EOS; recommend.response_tokens). Each prompt is encoded once
(generation.prefill, the prefix all prompts share once). Titles are then scored in blocks of a prefix
trie: titles sorted by their tokens share their leading tokens (the opening quote, a series name, ...),
and each distinct prefix of a block's titles is one trie node, run through the model once per prompt
whatever the number of titles that start with it. A node attends to the prompt's cached keys and values
and to its own ancestors (the title's earlier tokens), at the position its depth gives; its logits score
the next token of every title through it. A title's last token (EOS) predicts nothing, so it is no node.
The result is the full forward of each title after the prompt (tests/test_ranking.py), with fewer rows:
on 1,000 synthetic titles, 6,656 node rows (13 blocks of 512) against 12,288 padded title tokens before.
A running top-k keeps memory at [prompts, block] scores for any catalog size. Unlike grounding, this
ranks with the client's adapters: it asks the fine-tuned model directly how likely each item is.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fellrec_jax.model import generation
from fellrec_jax.evaluation import grounding
from fellrec_jax.model import kernels
from fellrec_jax.model import llama as model_lib
from fellrec_jax.evaluation import topk as topk_lib


class TrieBlock(NamedTuple):
  """A block of titles as trie nodes (N nodes, B titles, D >= its longest response - 1; numpy or jax).

  Node n is the prefix of some titles ending with token `tokens[n]` at `depth[n]` (0: a title's first
  token); `path[n, d]` is its ancestor at depth d (itself at d = depth[n]; 0 beyond). Title b's token
  j + 1 is predicted by node `title_nodes[b, j]` (valid for j < its length - 1); its first token by the
  prompt. Filler nodes have depth 0; filler titles have id -1.
  """

  tokens: np.ndarray  # int32 [N]
  depth: np.ndarray  # int32 [N]
  path: np.ndarray  # int32 [N, D]
  first: np.ndarray  # int32 [B] each title's first token
  title_nodes: np.ndarray  # int32 [B, D]
  targets: np.ndarray  # int32 [B, D] the token each title node predicts
  valid: np.ndarray  # bool [B, D]
  ids: np.ndarray  # int32 [B] item ids, -1 on filler rows


def node_rope(next_pos_P, depth: int, cfg):
  """The rotary tables (cos, sin) [P, depth, Dh] of the positions a node of depth 0..depth-1 takes after each
  prompt (`next_pos_P`: a title's first token). Computed once per batch of prompts and passed to each block
  as data: inside a block's program XLA would fuse cos and sin into the gather of every node's ancestors,
  evaluating them again for each of the D ancestors that read a key (measured 3.7 ms against 0.5 ms per
  gather on 8 x 512 nodes of depth 12)."""
  return kernels.rope_tables(next_pos_P[:, None] + jnp.arange(depth, dtype=jnp.int32)[None], cfg)


def trie_logprobs(base, adapters, cache: generation.Cache, rope_PxD, first_logp_PxV, block: TrieBlock, cfg, lcfg):
  """float32 [P, B]: the summed log-probability of each title of the block after each cached prompt.

  `cache` holds the prompts' keys/values (generation.prefill: the shared prefix once, each prompt's own
  tokens: keys [L, P, K, H, S], values [L, P, K, S, H]); `first_logp_PxV` their next-token log-probs
  (which score each title's first token); `rope_PxD` the rotary tables of node depths (`node_rope`, at
  least the block's deepest node + 1). Rows are (prompt, node) pairs, one token each: a node reads its
  prompt's keys (one matmul per prompt and kv head over all its nodes' queries) and gathers its ancestors'
  keys of the same layer.
  """
  P, (N, D) = rope_PxD[0].shape[0], block.path.shape
  cos, sin = (table[:, block.depth].reshape(P * N, 1, -1) for table in rope_PxD)
  own_mask = (jnp.arange(D)[None] <= block.depth[:, None])[None]  # a node reads its path up to itself
  own_mask = jnp.broadcast_to(own_mask, (P, N, D)).reshape(P * N, 1, 1, D)
  prompt_mask = cache.prompt_valid[:, None, None, :]
  x = model_lib.embed(base, block.tokens, cfg)
  x = jnp.broadcast_to(x[None], (P, N, x.shape[-1])).reshape(P * N, 1, -1)

  def ancestors(kv):  # [P * N, 1, K, H] -> [P * N, D, K, H]: each node's path in the same layer
    return kv.reshape(P, N, *kv.shape[2:])[:, block.path].reshape(P * N, D, *kv.shape[2:])

  def layer_fn(x, index, layer, layer_adapters):
    def attention(q, k, v):
      segments = generation.prefix_segment(cache.prefix, index) + [
          generation.Segment(cache.prompt_k[index], cache.prompt_v[index], prompt_mask),
          generation.Segment(ancestors(k), ancestors(v), own_mask, per_row=True)]
      return generation.attend_segments(q, segments, cfg.head_dim ** -0.5), None

    return model_lib.decoder_layer(x, layer, layer_adapters, attention, cos, sin, cfg, lcfg)[0]

  x = generation.over_layers(layer_fn, x, base, adapters, cfg.num_layers)
  logits_PxNxV = model_lib.lm_logits(base, model_lib.final_norm(base, x[:, 0], cfg), cfg).reshape(P, N, -1)
  logp_PxBxD = (logits_PxNxV[:, block.title_nodes, block.targets]
                - jax.nn.logsumexp(logits_PxNxV, axis=-1)[:, block.title_nodes])
  later = jnp.sum(jnp.where(block.valid[None], logp_PxBxD, 0.0), axis=-1)
  return first_logp_PxV[:, block.first] + later


@functools.partial(jax.jit, static_argnames=("cfg", "lcfg", "depth", "k"))
def _prefill(base, adapters, prompt_PxT, mask_PxT, prefix, *, cfg, lcfg, depth: int, k: int):
  """(first log-probs, cache, node rope tables, an empty running top-k). The top-k is made here, with the
  other inputs of `_score_block`, so that it is typed (placed) as the top-k each block returns: one
  compilation of a block's shape, not one for the first block and one for the rest."""
  logits, cache, next_pos = generation.prefill(base, adapters, prompt_PxT, mask_PxT, cfg, lcfg, 0, 1, prefix)
  return (jax.nn.log_softmax(logits, axis=-1), cache, node_rope(next_pos, depth, cfg),
          topk_lib.init_topk(prompt_PxT.shape[0], k))


@functools.partial(jax.jit, static_argnames=("cfg", "lcfg", "k"))
def _score_block(best, base, adapters, cache, rope_PxD, first_logp_PxV, block: TrieBlock, offset, exclude_PxH, *,
                 cfg, lcfg, k: int):
  """Merge one block of titles into the running top-k of each prompt."""
  scores_PxB = trie_logprobs(base, adapters, cache, rope_PxD, first_logp_PxV, block, cfg, lcfg)
  banned_PxB = topk_lib.excluded_in_block(exclude_PxH, offset, block.ids.shape[0]) | (block.ids < 0)[None]
  scores_PxB = jnp.where(banned_PxB, -jnp.inf, scores_PxB)
  return topk_lib.merge_topk(*best, scores_PxB, jnp.broadcast_to(block.ids, scores_PxB.shape), k)


def rank_by_likelihood(base, adapters, cfg, lcfg, prompts: Sequence[Sequence[int]],
                       responses: Sequence[Sequence[int]], exclude: Sequence[Sequence[int]], k: int, *,
                       prompt_batch: int = 8, title_tokens: int = 512, pad_id: int = 0,
                       prefix_length: int | None = None, progress=None) -> tuple[np.ndarray, np.ndarray]:
  """(item ids int64 [N, k], their log-probabilities float32 [N, k]), best first, history excluded.

  prompts: token lists ending with "### Response:\\n" (BOS, no EOS); responses: item i's response tokens
  (EOS included); exclude: per prompt, items never to rank. The prompts' first `prefix_length` tokens
  (default: all they share, generation.common_prefix_length) are encoded once; the rest go in batches of
  `prompt_batch` sorted by length, all left-padded to one length; titles are cut into trie blocks of
  `title_tokens` nodes (`trie_blocks`; memory: prompt_batch x title_tokens x vocab logits), of one shape
  per depth bucket, so compilations stay few. Ties go to the title first in the blocks' order.
  `progress(n)` is called after each batch of n prompts.
  """
  if len(exclude) != len(prompts):
    raise ValueError(f"{len(prompts)} prompts but {len(exclude)} exclusion lists")
  order, blocks = trie_blocks(responses, title_tokens, pad_id)
  # Blocks index titles by their place in `order`, so a user's history maps to those places.
  place = np.empty(len(order), np.int64)
  place[order] = np.arange(len(order))
  exclude_NxH = topk_lib.pad_item_lists([place[np.asarray(items, np.int64)] for items in exclude])
  blocks = [(offset, jax.device_put(block)) for offset, block in blocks]
  depth = max(block.path.shape[1] for _, block in blocks)

  prefix, suffixes = generation.split_prefix(base, adapters, cfg, lcfg, prompts, prefix_length)
  prompt_order = np.argsort([len(p) for p in suffixes], kind="stable")
  length = grounding.padded_length(max(len(p) for p in suffixes))
  ranked = np.zeros((len(prompts), k), np.int64)
  scores = np.zeros((len(prompts), k), np.float32)
  for start in range(0, len(prompts), prompt_batch):
    index = prompt_order[start:start + prompt_batch]
    ids, mask = grounding.left_pad([suffixes[i] for i in index], length, prompt_batch, pad_id)
    first_logp, cache, rope, best = _prefill(base, adapters, ids, mask, prefix, cfg=cfg, lcfg=lcfg, depth=depth,
                                             k=k)
    exclude_PxH = np.full((prompt_batch, exclude_NxH.shape[1]), topk_lib.NO_ITEM, np.int32)
    exclude_PxH[:len(index)] = exclude_NxH[index]
    for offset, block in blocks:
      best = _score_block(best, base, adapters, cache, rope, first_logp, block, offset, exclude_PxH,
                          cfg=cfg, lcfg=lcfg, k=k)
    ranked[index] = topk_lib.finalize(*best)[:len(index)]
    scores[index] = np.asarray(best[0])[:len(index)]
    if progress is not None:
      progress(len(index))
  return ranked, scores


def trie_blocks(responses: Sequence[Sequence[int]], nodes: int, pad_id: int = 0
                ) -> tuple[np.ndarray, list[tuple[int, TrieBlock]]]:
  """(order, [(offset, block)]): the items sorted by length bucket (`grounding.padded_length`), then by
  their tokens, cut into consecutive blocks whose titles need at most `nodes` trie nodes (at least the
  longest title's); block j holds the items order[offset_j:offset_j + its titles]. Blocks share their
  number of nodes and of titles (the most any block holds, rounded up to a multiple of 8); their depth is
  the length bucket of their longest title, so a few long titles do not widen every block, and shapes
  (compilations) stay few."""
  if len(responses) == 0 or min(len(r) for r in responses) == 0:
    raise ValueError("every catalog item needs at least one response token")
  bucket = lambda n: grounding.padded_length(max(n, 1), minimum=4)
  order = np.array(sorted(range(len(responses)), key=lambda i: (bucket(len(responses[i])), tuple(responses[i]))),
                   np.int64)
  nodes = max(nodes, max(len(r) for r in responses) - 1)
  groups, current, start = [], {}, 0
  for place, item in enumerate(order):
    prefixes = [tuple(responses[item][:j]) for j in range(1, len(responses[item]))]
    if current and len(current) + sum(p not in current for p in prefixes) > nodes:
      groups.append((start, place, current))
      current, start = {}, place
    for p in prefixes:
      current.setdefault(p, len(current))
  groups.append((start, len(order), current))
  titles = -(-max(stop - start for start, stop, _ in groups) // 8) * 8
  depth = lambda items: bucket(max(len(responses[i]) for i in items) - 1)
  return order, [(start, _trie_block(responses, order[start:stop], index, nodes, titles, depth(order[start:stop]),
                                     pad_id)) for start, stop, index in groups]


def _trie_block(responses, items: np.ndarray, index: dict, nodes: int, titles: int, depth: int,
                pad_id: int) -> TrieBlock:
  """The TrieBlock of these items, whose response prefixes `index` numbers 0..len(index)-1."""
  tokens = np.full(nodes, pad_id, np.int32)
  node_depth = np.zeros(nodes, np.int32)
  path = np.zeros((nodes, depth), np.int32)
  path[:, 0] = np.arange(nodes)  # filler nodes read themselves
  for prefix, node in index.items():  # in insertion order: a node's parent comes before it
    d = len(prefix) - 1
    tokens[node], node_depth[node] = prefix[-1], d
    if d:
      path[node, :d] = path[index[prefix[:-1]], :d]
    path[node, d] = node
  first = np.full(titles, pad_id, np.int32)
  title_nodes = np.zeros((titles, depth), np.int32)
  targets = np.zeros((titles, depth), np.int32)
  valid = np.zeros((titles, depth), bool)
  ids = np.full(titles, -1, np.int32)
  for row, item in enumerate(items):
    response, n = responses[item], len(responses[item]) - 1
    first[row] = response[0]
    if n:
      title_nodes[row, :n] = path[index[tuple(response[:n])], :n]
      targets[row, :n], valid[row, :n] = response[1:], True
    ids[row] = item
  return TrieBlock(tokens, node_depth, path, first, title_nodes, targets, valid, ids)
