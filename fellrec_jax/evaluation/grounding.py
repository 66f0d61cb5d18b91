"""BIGRec grounding (docs/method.md §5.2): embed titles and predictions with the base model, rank items by L2 distance.

An embedding is the last-layer hidden state of a text's last token, with the base model (no adapters).
BIGRec takes `model(**tok, output_hidden_states=True).hidden_states[-1][:, -1, :]` on a left-padded batch;
in transformers 5.x `hidden_states[-1]` is the output of the final RMSNorm (`last_hidden_state`, see
`capture_outputs(tie_last_hidden_states=True)`), i.e. exactly `model.forward_hidden(...).rows` here.

Positions. transformers' plain forward numbers positions 0..T-1 over the padded row, so with left padding
a title's embedding depends on how much padding its batch needed (BIGRec batches 4 titles in catalog
order). By default we number each text's own tokens from 0 (positions = cumsum(mask) - 1), so that an
embedding depends on the text alone: the same token sequence always embeds to the same vector.
`bigrec_positions=True` reproduces the reference: batches in input order, padded to the batch's longest
text, positions counted over the padding.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fellrec_jax.model import lora as lora_lib
from fellrec_jax.model import llama as model_lib
from fellrec_jax.evaluation import topk as topk_lib

_NO_LORA = lora_lib.LoraConfig()  # embeddings use the base model: no adapter is ever applied


def left_pad(token_lists: Sequence[Sequence[int]], length: int, rows: int, pad_id: int = 0):
  """(ids int32 [rows, length], mask int32) with each list right-aligned; missing rows are all padding."""
  ids = np.full((rows, length), pad_id, np.int32)
  mask = np.zeros((rows, length), np.int32)
  for row, tokens in enumerate(token_lists):
    if not 0 < len(tokens) <= length:
      raise ValueError(f"token list {row} has {len(tokens)} tokens; need 1..{length}")
    ids[row, length - len(tokens):] = tokens
    mask[row, length - len(tokens):] = 1
  return ids, mask


def padded_length(n: int, minimum: int = 8) -> int:
  """The smallest of minimum, 2^j and 3 * 2^(j-1) (8, 12, 16, 24, 32, 48, ...) that holds n tokens.

  Two shapes per octave: at most 1.5x padding, and few compilations across texts of any length (each
  shape compiles once; a large model compiles for tens of seconds).
  """
  length = minimum
  while length < n:
    length = length * 3 // 2 if length & (length - 1) == 0 else length * 4 // 3
  return length


@functools.partial(jax.jit, static_argnames=("cfg", "bigrec_positions"))
def _last_hidden(base, ids_BxT, mask_BxT, *, cfg, bigrec_positions: bool):
  """Final-normed hidden state of the last position of left-padded rows: [B, D] float32."""
  positions = None if bigrec_positions else jnp.maximum(jnp.cumsum(mask_BxT, axis=1) - 1, 0)
  inputs = model_lib.plain_inputs(ids_BxT, mask_BxT, positions)
  return model_lib.forward_hidden(base, {}, inputs, cfg, _NO_LORA).rows[:, -1].astype(jnp.float32)


def embed_texts(base, cfg: model_lib.LlamaConfig, token_lists: Sequence[Sequence[int]], batch_size: int = 32, *,
                bigrec_positions: bool = False) -> np.ndarray:
  """float32 [N, D]: the final-normed last-layer hidden state of each token list's last token.

  Token lists are embedded as given (the caller adds BOS, as a tokenizer call does by default). Batches
  are left-padded; by default texts are sorted by length and padded to `padded_length`, and the result
  does not depend on the batching. `bigrec_positions=True` reproduces BIGRec (module docstring).
  """
  n = len(token_lists)
  lengths = np.array([len(tokens) for tokens in token_lists])
  order = np.arange(n) if bigrec_positions else np.argsort(lengths, kind="stable")
  out = np.zeros((n, cfg.hidden_size), np.float32)
  for start in range(0, n, batch_size):
    index = order[start:start + batch_size]
    longest = int(lengths[index].max())
    length = longest if bigrec_positions else padded_length(longest)
    ids, mask = left_pad([token_lists[i] for i in index], length, batch_size)
    hidden = _last_hidden(base, ids, mask, cfg=cfg, bigrec_positions=bigrec_positions)
    out[index] = np.asarray(hidden)[:len(index)]
  return out


def item_embeddings(base, cfg: model_lib.LlamaConfig, token_lists: Sequence[Sequence[int]], cache_dir=None,
                    batch_size: int = 32, *, bigrec_positions: bool = False,
                    params_key: str | None = None) -> np.ndarray:
  """`embed_texts` of the catalog titles, cached as .npy under `cache_dir` (None: no cache).

  The cache key hashes the base parameters (or `params_key`, e.g. a checkpoint name, to skip hashing
  a large model), the config and the title tokens, so a new checkpoint or catalog never reuses a file.
  """
  if cache_dir is None:
    return embed_texts(base, cfg, token_lists, batch_size, bigrec_positions=bigrec_positions)
  key = cache_key(base, cfg, token_lists, bigrec_positions=bigrec_positions,
                  batch_size=batch_size if bigrec_positions else None, params_key=params_key)
  path = Path(cache_dir) / f"item_embeddings_{key}.npy"
  if path.exists():
    cached = np.load(path)
    if cached.shape == (len(token_lists), cfg.hidden_size):
      return cached
  embeddings = embed_texts(base, cfg, token_lists, batch_size, bigrec_positions=bigrec_positions)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_suffix(f".{os.getpid()}.tmp.npy")
  np.save(partial, embeddings)
  os.replace(partial, path)  # atomic: a concurrent reader never sees half a file
  return embeddings


def cache_key(base, cfg, token_lists, *, params_key: str | None = None, **settings) -> str:
  """A hex digest of what the item embeddings depend on."""
  digest = hashlib.sha256()
  digest.update(json.dumps([repr(cfg), settings], sort_keys=True, default=str).encode())
  if params_key is not None:
    digest.update(params_key.encode())
  else:
    for path, leaf in jax.tree_util.tree_flatten_with_path(base)[0]:
      leaf = np.asarray(leaf)
      digest.update(f"{jax.tree_util.keystr(path)}{leaf.dtype}{leaf.shape}".encode())
      digest.update(np.ascontiguousarray(leaf).tobytes())
  for tokens in token_lists:
    digest.update(np.asarray(tokens, np.int64).tobytes() + b"|")
  return digest.hexdigest()[:20]


# ----------------------------------------------------------------------------------------------------
# Nearest items


@functools.partial(jax.jit, static_argnames=("k",))
def _nearest(pred_QxD, items_NbxBxD, exclude_QxH, num_items, *, k: int):
  """Running top-k of the nearest items over item blocks: (negated squared distances, ids) [Q, k]."""
  Q = pred_QxD.shape[0]
  _, B, _ = items_NbxBxD.shape
  pred_sq_Q = jnp.sum(pred_QxD * pred_QxD, axis=1)
  kb = min(k, B)

  def body(carry, xs):
    items_BxD, offset = xs
    ids_B = offset + jnp.arange(B)
    # The expanded form selects candidates cheaply; their distances are then recomputed directly, so
    # that ranking is not blurred by cancellation in |p|^2 + |e|^2 - 2 p.e (identical vectors give 0).
    approx_QxB = pred_sq_Q[:, None] - 2.0 * pred_QxD @ items_BxD.T + jnp.sum(items_BxD * items_BxD, axis=1)
    banned_QxB = topk_lib.excluded_in_block(exclude_QxH, offset, B) | (ids_B >= num_items)[None]
    _, cand_Qxk = jax.lax.top_k(jnp.where(banned_QxB, -jnp.inf, -approx_QxB), kb)
    diff_QxkxD = pred_QxD[:, None, :] - items_BxD[cand_Qxk]
    exact_Qxk = jnp.sum(diff_QxkxD * diff_QxkxD, axis=2)
    scores_Qxk = jnp.where(jnp.take_along_axis(banned_QxB, cand_Qxk, axis=1), -jnp.inf, -exact_Qxk)
    return topk_lib.merge_topk(*carry, scores_Qxk, offset + cand_Qxk, k), None

  offsets = jnp.arange(items_NbxBxD.shape[0]) * B
  (scores, ids), _ = jax.lax.scan(body, topk_lib.init_topk(Q, k), (items_NbxBxD, offsets))
  return scores, ids


def rank_by_distance(pred_NxD, item_IxD, exclude: Sequence[Sequence[int]], k: int, *, block: int = 4096,
                     query_block: int = 256) -> np.ndarray:
  """int64 [N, k]: item ids by ascending L2 distance to each prediction, excluded items removed.

  Items are scored in blocks of `block` with a running top-k and queries in chunks of `query_block`, so
  memory is O(query_block * block) whatever the catalog size. Ties go to the lower item id; rows with
  fewer than k rankable items end with -1.
  """
  pred_NxD = np.asarray(pred_NxD, np.float32)
  item_IxD = np.asarray(item_IxD, np.float32)
  if len(exclude) != len(pred_NxD):
    raise ValueError(f"{len(pred_NxD)} predictions but {len(exclude)} exclusion lists")
  num_items, dim = item_IxD.shape
  block = min(block, num_items)
  num_blocks = -(-num_items // block)
  items = np.zeros((num_blocks * block, dim), np.float32)
  items[:num_items] = item_IxD
  items = jnp.asarray(items.reshape(num_blocks, block, dim))
  exclude = topk_lib.pad_item_lists(exclude)
  out = []
  for start in range(0, len(pred_NxD), query_block):
    pred = pred_NxD[start:start + query_block]
    rows = len(pred)
    pred = np.pad(pred, ((0, query_block - rows), (0, 0))) if len(pred_NxD) > query_block else pred
    excl = np.pad(exclude[start:start + rows], ((0, len(pred) - rows), (0, 0)), constant_values=-1)
    scores, ids = _nearest(jnp.asarray(pred), items, jnp.asarray(excl), num_items, k=k)
    out.append(topk_lib.finalize(scores, ids)[:rows])
  return np.concatenate(out) if out else np.zeros((0, k), np.int64)
