"""A prefix trie over token sequences (the catalog's responses), stored as flat CSR arrays for jit.

Node 0 is the root. The children of node u are `child_tokens[offsets[u]:offsets[u+1]]` (sorted) and the
nodes they lead to `child_nodes[...]`; `item_of_node[u]` is the item whose whole sequence ends at u
(-1 elsewhere). No dense [nodes, vocab] table: memory is O(total tokens). Node -1 is "dead" (a sequence
left the trie) and has no children. Constrained beam search (generation.beam_search(trie=...)) keeps one
node per beam and allows only its children.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DEAD = -1


@dataclasses.dataclass(frozen=True)
class Trie:
  offsets: jax.Array  # int32 [nodes + 1]
  child_tokens: jax.Array  # int32 [edges], sorted within each node
  child_nodes: jax.Array  # int32 [edges]
  item_of_node: jax.Array  # int32 [nodes]: the item whose sequence ends here, else -1
  max_children: int  # static: the widest node (the window every lookup reads)

  @property
  def num_nodes(self) -> int:
    return int(self.item_of_node.shape[0])


jax.tree_util.register_dataclass(Trie, data_fields=["offsets", "child_tokens", "child_nodes", "item_of_node"],
                                 meta_fields=["max_children"])


def build_trie(sequences: Sequence[Sequence[int]]) -> Trie:
  """The trie of sequences; sequence i is item i. A repeated sequence keeps its first item."""
  children: list[dict[int, int]] = [{}]
  item_of_node = [-1]
  for item, sequence in enumerate(sequences):
    if len(sequence) == 0:
      raise ValueError(f"sequence {item} is empty: every item needs at least one token")
    node = 0
    for token in sequence:
      token = int(token)
      if token not in children[node]:
        children[node][token] = len(children)
        children.append({})
        item_of_node.append(-1)
      node = children[node][token]
    if item_of_node[node] < 0:
      item_of_node[node] = item
  counts = np.array([len(c) for c in children], np.int64)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
  edges = [sorted(c.items()) for c in children]
  tokens = np.array([t for e in edges for t, _ in e], np.int32)
  nodes = np.array([n for e in edges for _, n in e], np.int32)
  return Trie(jnp.asarray(offsets), jnp.asarray(tokens), jnp.asarray(nodes), jnp.asarray(item_of_node, jnp.int32),
              max(1, int(counts.max())))


def _children_window(trie: Trie, nodes_R):
  """(edge index [R, W], valid [R, W]) of each node's children, W = max_children."""
  safe = jnp.maximum(nodes_R, 0)
  start, stop = trie.offsets[safe], trie.offsets[safe + 1]
  edge = start[:, None] + jnp.arange(trie.max_children)[None]
  valid = (edge < stop[:, None]) & (nodes_R >= 0)[:, None]
  return jnp.minimum(edge, trie.child_tokens.shape[0] - 1), valid


def allowed_tokens(trie: Trie, nodes_R, vocab_size: int):
  """bool [R, V]: the tokens that continue some sequence from each node (none from a dead node)."""
  edge, valid = _children_window(trie, nodes_R)
  tokens = jnp.where(valid, trie.child_tokens[edge], vocab_size)  # invalid slots hit a dropped column
  rows = jnp.arange(nodes_R.shape[0])[:, None]
  return jnp.zeros((nodes_R.shape[0], vocab_size + 1), bool).at[rows, tokens].set(True)[:, :vocab_size]


def advance(trie: Trie, nodes_R, tokens_R):
  """The child of each node through its token, or -1 (dead) when the token leaves the trie."""
  edge, valid = _children_window(trie, nodes_R)
  match = valid & (trie.child_tokens[edge] == tokens_R[:, None])
  child = trie.child_nodes[jnp.take_along_axis(edge, jnp.argmax(match, axis=1)[:, None], axis=1)[:, 0]]
  return jnp.where(match.any(axis=1), child, DEAD)


def lookup(trie: Trie, sequences: Sequence[Sequence[int]]) -> np.ndarray:
  """int64 [N]: the item whose sequence each one is exactly, or -1 (host-side)."""
  offsets, tokens, nodes, items = (np.asarray(a) for a in
                                   (trie.offsets, trie.child_tokens, trie.child_nodes, trie.item_of_node))
  out = np.full(len(sequences), -1, np.int64)
  for row, sequence in enumerate(sequences):
    node = 0
    for token in sequence:
      lo, hi = offsets[node], offsets[node + 1]
      at = lo + np.searchsorted(tokens[lo:hi], token)
      if at >= hi or tokens[at] != token:
        node = DEAD
        break
      node = nodes[at]
    if node != DEAD:
      out[row] = items[node]
  return out
