"""Token recovery from the hidden states the server receives (h_k, after the client's first k layers).

Nearest-neighbour inversion: each state is matched to the public base's most similar token embedding
(cosine similarity); at k = 0 the states are the embeddings themselves, so every token is recovered.
Learned inversion: a probe (probe.py) from a state to its token, trained on states of public text that
the server can compute itself (it holds the base and, through aggregation, the adapters) and applied to
the client's private examples, which it never trains on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fellrec_jax.privacy import probe as probe_lib


@jax.jit
def _nearest(h, embedding):
  unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return jnp.argmax(unit(h.astype(jnp.float32)) @ unit(embedding.astype(jnp.float32)).T, axis=-1)


def nearest_neighbour(states, embedding, chunk: int = 8192) -> np.ndarray:
  """The token [N] whose embedding (rows of [V, D]) is most similar in direction to each state [N, D]."""
  states = np.asarray(states)
  out = [np.asarray(_nearest(jnp.asarray(states[i:i + chunk]), embedding)) for i in range(0, len(states), chunk)]
  return np.concatenate(out) if out else np.zeros(0, np.int64)


def learned_inverter(public_states, public_tokens, vocab_size: int, pc: probe_lib.ProbeConfig) -> probe_lib.Probe:
  """A probe from states [N, D] to their tokens [N], trained on public text."""
  return probe_lib.fit(public_states, public_tokens, vocab_size, pc)


def inverter_accuracy(inverter: probe_lib.Probe, private_states, private_tokens) -> float:
  """Top-1 token accuracy of a trained inverter on held-out (private) states."""
  return probe_lib.top1_accuracy(probe_lib.scores(inverter, private_states), private_tokens)


def nearest_neighbour_accuracy(states, tokens, embedding) -> float:
  if len(tokens) == 0:
    return float("nan")
  return float(np.mean(nearest_neighbour(states, embedding) == np.asarray(tokens)))
