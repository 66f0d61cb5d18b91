"""What an honest-but-curious server can recover from what crosses the split (docs/privacy.md).

The server sees, for each training example of a client, the hidden states h_k of every token after the
client's first k layers, and the gradient dL/dh_{L-1} that the client's back part returns. Its attacks:

- token recovery from h_k: nearest-neighbour and learned inversion (inversion.py);
- item recovery from h_k: probes from the states averaged over the example's private tokens to the
  user's history items (precision of the top-|H| items) and to the target item (top-1);
- label leakage from dL/dh_{L-1}: probes from the gradient at a position to the label token it predicts
  (top-1), and from its average over the label positions to the target item (top-1).

Every probe is trained on public examples, random catalog titles in the public prompt template, whose
states and gradients the server computes itself (it holds the base and, through aggregation, the
client's adapters), and is scored on the client's private training examples, which it never trains on.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fellrec_jax.data import prompts
from fellrec_jax.data.records import make_record, parse_record
from fellrec_jax.model import llama as model_lib
from fellrec_jax.model import loss as loss_lib
from fellrec_jax.privacy import defences as defences_lib
from fellrec_jax.privacy import inversion
from fellrec_jax.privacy import probe as probe_lib


class Examples(NamedTuple):
  """Encoded examples, one per row, padded to a common length."""

  tokens: np.ndarray  # [N, T] int32
  valid: np.ndarray  # [N, T] bool: a real token
  private: np.ndarray  # [N, T] bool: a real token after the shared prompt prefix (not public template text)
  labels: np.ndarray  # [N, T] float32: the token is a training label (the loss mask)
  history: tuple[tuple[int, ...], ...]  # each example's history item ids
  target: np.ndarray  # [N] int32: each example's (first) target item id


# ----------------------------------------------------------------------------------------------------
# Examples


def public_records(dataset, like: Sequence, count: int, seed: int) -> list:
  """`count` records of random catalog titles in the template of the records `like` (history lengths
  drawn from theirs): text the server can write itself."""
  rng = np.random.default_rng(seed)
  parts = [parse_record(r) for r in like]
  lengths = [len(p.history) for p in parts]
  template = parts[0]
  catalog = dataset.catalog
  records = []
  for _ in range(count):
    n = int(rng.choice(lengths))
    items = rng.choice(len(catalog), n + 1, replace=False)
    records.append(make_record(template.instruction, template.input_phrase, [catalog[i] for i in items[:-1]],
                               template.input_end, [catalog[items[-1]]], user=-1))
  return records


def encode(tokenizer, dataset, records: Sequence, *, prefix_len: int, cutoff_len: int, train_on_inputs: bool,
           pad_id: int) -> Examples:
  """Records as padded rows; the first `prefix_len` tokens (the shared prompt prefix) are public."""
  encoded = [prompts.encode_example(tokenizer, r, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs)
             for r in records]
  T = max(len(ids) for ids, _ in encoded)
  tokens = np.full((len(records), T), pad_id, np.int32)
  valid = np.zeros((len(records), T), bool)
  labels = np.zeros((len(records), T), np.float32)
  for i, (ids, mask) in enumerate(encoded):
    tokens[i, :len(ids)], valid[i, :len(ids)], labels[i, :len(ids)] = ids, True, mask
  private = valid & (np.arange(T) >= prefix_len)[None]
  parts = [parse_record(r) for r in records]
  history = tuple(tuple(dataset.item_ids(p.history)) for p in parts)
  target = np.asarray([dataset.item_id(p.targets[0]) for p in parts], np.int32)
  return Examples(tokens, valid, private, labels, history, target)


# ----------------------------------------------------------------------------------------------------
# The server's views


@functools.partial(jax.jit, static_argnames=("cfg", "lcfg", "k"))
def _front_rows(base, adapters, tokens, valid, cfg, lcfg, k):
  return model_lib.front(base, adapters, model_lib.plain_inputs(tokens, valid), cfg, lcfg, k).rows


@functools.partial(jax.jit, static_argnames=("cfg", "lcfg"))
def _back_gradient(base, adapters, tokens, valid, labels, cfg, lcfg):
  inputs = model_lib.plain_inputs(tokens, valid)
  h = model_lib.front(base, adapters, inputs, cfg, lcfg, cfg.num_layers - 1)

  def client_back(h):
    hidden = model_lib.back_hidden(base, adapters, h, inputs, cfg, lcfg)
    return loss_lib.packed_nll(base, hidden, inputs, labels, jnp.zeros((0,), jnp.float32), cfg)[0]

  return jax.grad(client_back)(h).rows


def _chunked(fn, ex: Examples, chunk: int, *arrays):
  return np.concatenate([np.asarray(fn(*(a[i:i + chunk] for a in arrays))) for i in range(0, len(ex.tokens), chunk)])


def boundary_states(base, adapters, ex: Examples, cfg, lcfg, k: int, chunk: int = 64) -> np.ndarray:
  """h_k [N, T, D]: the states after the first k layers (k = 0: the embeddings), as the server receives."""
  fn = lambda t, v: _front_rows(base, adapters, t, v, cfg, lcfg, k)
  return _chunked(fn, ex, chunk, ex.tokens, ex.valid)


def boundary_gradient(base, adapters, ex: Examples, cfg, lcfg, chunk: int = 64) -> np.ndarray:
  """dL/dh_{L-1} [N, T, D]: the gradient the client's back part returns for its summed label NLL."""
  fn = lambda t, v, m: _back_gradient(base, adapters, t, v, m, cfg, lcfg)
  return _chunked(fn, ex, chunk, ex.tokens, ex.valid, ex.labels)


def released(states: np.ndarray, d: defences_lib.Defences, seed: int) -> np.ndarray:
  """The states after the boundary defence (clipping, then noise), as the server receives them."""
  h = defences_lib.clip_tokens(jnp.asarray(states), d.boundary_clip)
  return np.asarray(defences_lib.add_token_noise(h, d.boundary_clip, d.boundary_noise, jax.random.key(seed)))


# ----------------------------------------------------------------------------------------------------
# Features and attacks


def token_features(states, ex: Examples):
  """(states [M, D], tokens [M]) at the examples' private positions."""
  return states[ex.private], ex.tokens[ex.private]


def pooled(states, where):
  """Each example's mean state [N, D] over the positions `where` [N, T]."""
  w = where.astype(np.float32)
  return np.einsum("ntd,nt->nd", states, w) / np.maximum(w.sum(axis=1, keepdims=True), 1.0)


def label_positions(ex: Examples):
  """[N, T] bool: positions whose next token is a label (the gradient there carries that label)."""
  nxt = np.zeros_like(ex.labels, dtype=bool)
  nxt[:, :-1] = ex.labels[:, 1:] > 0
  return nxt


def history_targets(ex: Examples, num_items: int) -> np.ndarray:
  """[N, num_items]: uniform over each example's history items."""
  out = np.zeros((len(ex.history), num_items), np.float32)
  for i, items in enumerate(ex.history):
    out[i, list(items)] = 1.0 / max(len(items), 1)
  return out


def token_recovery(public_states, public: Examples, private_states, private: Examples, embedding, vocab_size: int,
                   pc: probe_lib.ProbeConfig) -> dict:
  """Top-1 token accuracy of the nearest-neighbour and the learned inverter on the private tokens."""
  pub_h, pub_t = token_features(public_states, public)
  priv_h, priv_t = token_features(private_states, private)
  inverter = inversion.learned_inverter(pub_h, pub_t, vocab_size, pc)
  majority = np.bincount(pub_t, minlength=vocab_size).argmax()
  return {"token_nearest": inversion.nearest_neighbour_accuracy(priv_h, priv_t, embedding),
          "token_learned": inversion.inverter_accuracy(inverter, priv_h, priv_t),
          "token_majority": float(np.mean(priv_t == majority))}


def item_recovery(public_states, public: Examples, private_states, private: Examples, num_items: int,
                  pc: probe_lib.ProbeConfig) -> dict:
  """History precision@|H| and target top-1 of probes on the states averaged over private positions."""
  pub_x, priv_x = pooled(public_states, public.private), pooled(private_states, private.private)
  history = probe_lib.fit(pub_x, history_targets(public, num_items), num_items, pc)
  target = probe_lib.fit(pub_x, public.target, num_items, pc)
  mean_history = np.mean([len(h) for h in private.history])
  return {"history_precision": probe_lib.set_precision(probe_lib.scores(history, priv_x), private.history),
          "history_chance": float(mean_history / num_items),
          "target_top1": probe_lib.top1_accuracy(probe_lib.scores(target, priv_x), private.target),
          "target_chance": 1.0 / num_items}


def label_leakage(public_grads, public: Examples, private_grads, private: Examples, vocab_size: int,
                  num_items: int, pc: probe_lib.ProbeConfig) -> dict:
  """Label tokens (top-1) and target items (top-1) read from the returned gradient by probes."""
  pub_at, priv_at = label_positions(public), label_positions(private)
  next_token = lambda ex: np.concatenate([ex.tokens[:, 1:], ex.tokens[:, :1]], axis=1)
  tokens = probe_lib.fit(public_grads[pub_at], next_token(public)[pub_at], vocab_size, pc)
  pub_x, priv_x = pooled(public_grads, pub_at), pooled(private_grads, priv_at)
  target = probe_lib.fit(pub_x, public.target, num_items, pc)
  return {"gradient_label_token": probe_lib.top1_accuracy(probe_lib.scores(tokens, private_grads[priv_at]),
                                                          next_token(private)[priv_at]),
          "gradient_target_top1": probe_lib.top1_accuracy(probe_lib.scores(target, priv_x), private.target)}
