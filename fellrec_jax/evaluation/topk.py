"""Top-k over a catalog scored in blocks, with excluded items: the memory-bounded core of every ranker.

A ranker scores items block by block and keeps a running top-k per query, so that memory holds
[queries, block] scores, never [queries, catalog]. Excluded items (a user's train+valid history) are
given as a padded int32 array [N, H] (-1 = no item) and are never returned. Ties go to the lower item id.
A row with fewer than k rankable items is filled with item id -1 (never a hit in metrics.py).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NO_ITEM = -1


def pad_item_lists(item_lists: Sequence[Sequence[int]], multiple: int = 16) -> np.ndarray:
  """int32 [N, H] of item-id lists, right-padded with -1; H > 0 is a multiple of `multiple` (few shapes)."""
  width = max([1] + [len(items) for items in item_lists])
  width = -(-width // multiple) * multiple
  out = np.full((len(item_lists), width), NO_ITEM, np.int32)
  for row, items in enumerate(item_lists):
    out[row, :len(items)] = np.asarray(items, np.int64)
  return out


def excluded_in_block(exclude_NxH, offset, block: int):
  """bool [N, block]: which items offset..offset+block-1 each row excludes (a scatter, not [N, H, B])."""
  local_NxH = exclude_NxH - offset
  inside = (exclude_NxH >= 0) & (local_NxH >= 0) & (local_NxH < block)
  # Items outside the block land in an extra column that is dropped.
  local_NxH = jnp.where(inside, local_NxH, block)
  rows = jnp.arange(exclude_NxH.shape[0])[:, None]
  return jnp.zeros((exclude_NxH.shape[0], block + 1), bool).at[rows, local_NxH].set(True)[:, :block]


def init_topk(num_rows: int, k: int):
  """An empty running top-k: scores -inf, ids -1."""
  return jnp.full((num_rows, k), -jnp.inf, jnp.float32), jnp.full((num_rows, k), NO_ITEM, jnp.int32)


def merge_topk(best_scores_NxK, best_ids_NxK, scores_NxB, ids_NxB, k: int):
  """The k highest of a running top-k and new candidates (descending; the running ones win ties).

  With candidates from later blocks (higher ids) this keeps ties at the lower item id.
  """
  scores = jnp.concatenate([best_scores_NxK, scores_NxB.astype(jnp.float32)], axis=1)
  ids = jnp.concatenate([best_ids_NxK, ids_NxB.astype(jnp.int32)], axis=1)
  top_scores, index = jax.lax.top_k(scores, k)
  return top_scores, jnp.take_along_axis(ids, index, axis=1)


def finalize(scores_NxK, ids_NxK) -> np.ndarray:
  """Item ids [N, k] on the host, -1 where no rankable item was left (score -inf)."""
  return np.where(np.isneginf(np.asarray(scores_NxK)), NO_ITEM, np.asarray(ids_NxK)).astype(np.int64)
