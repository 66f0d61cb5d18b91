"""Who takes part in a round (docs/method.md §4, "Participation and faults"): the clients sampled to
train, those that fail to report, and those whose round went non-finite.

Every draw depends only on (seed, round) and the client ids, never on what happened before, so a run and
its resumption draw the same clients, and a client's failure in a round does not depend on which other
clients were sampled with it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fellrec_jax.federated import sharding

_SAMPLE, _DROPOUT = 1, 2  # independent random streams per (seed, round)


class Roster(NamedTuple):
  """One round's participants (host-side numpy)."""

  participants: np.ndarray  # int [m]: the clients that train this round, ascending
  dropped: np.ndarray  # bool [m]: the participant fails to report (its work is discarded)

  @property
  def everyone(self) -> bool:
    return bool(np.array_equal(self.participants, np.arange(len(self.participants))))


class Outcome(NamedTuple):
  """What the participants' round did (host-side, [m] each)."""

  roster: Roster
  finite: np.ndarray  # bool: the client's loss and adapters stayed finite
  include: np.ndarray  # bool: aggregated (reported and finite)


def outcome(roster: Roster, finite) -> Outcome:
  """The round's outcome from `finite_clients`' [m] flags (gathered from every process: a collective)."""
  finite = np.asarray(sharding.to_host(finite), bool)
  return Outcome(roster, finite, finite & ~roster.dropped)


def _rng(seed: int, round_index: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([seed % 2**32, round_index, stream])


def sample_participants(seed: int, round_index: int, eligible: np.ndarray, per_round: int) -> np.ndarray:
  """Ascending ids of `per_round` clients drawn without replacement from the `eligible` ([C] bool) ones;
  all eligible clients when per_round is 0 or at least their number."""
  ids = np.flatnonzero(np.asarray(eligible, bool))
  if per_round <= 0 or per_round >= len(ids):
    return ids
  return np.sort(_rng(seed, round_index, _SAMPLE).choice(ids, per_round, replace=False))


def sample_dropped(seed: int, round_index: int, participants: np.ndarray, num_clients: int,
                   prob: float) -> np.ndarray:
  """[m] bool: which participants fail to report, each with probability `prob` (one uniform draw per
  client id and round, whoever else takes part)."""
  if prob <= 0:
    return np.zeros(len(participants), bool)
  return _rng(seed, round_index, _DROPOUT).random(num_clients)[participants] < prob


def roster(seed: int, round_index: int, eligible: np.ndarray, per_round: int, dropout_prob: float) -> Roster:
  participants = sample_participants(seed, round_index, eligible, per_round)
  return Roster(participants, sample_dropped(seed, round_index, participants, len(eligible), dropout_prob))


@jax.jit
def finite_clients(adapters, train_loss):
  """[C] bool: the client's round loss and every adapter entry are finite."""
  ok = jnp.isfinite(train_loss)
  for leaf in jax.tree.leaves(adapters):
    ok &= jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
  return ok


def gather(tree, index):
  """The [m, ...] rows `index` of a client-stacked pytree (None stays None)."""
  return None if tree is None else jax.tree.map(lambda x: x[index], tree)


def scatter(tree, index, rows):
  """tree with rows `index` replaced by `rows` (None stays None)."""
  return None if tree is None else jax.tree.map(lambda x, r: x.at[index].set(r), tree, rows)


def check_config(config) -> None:
  """Clear errors for impossible fed.clients_per_round / dropout_prob / max_bad_rounds settings."""
  fed = config.fed
  per_round, prob, limit = fed.get("clients_per_round", 0), fed.get("dropout_prob", 0.0), fed.get("max_bad_rounds", 0)
  if per_round < 0:
    raise ValueError(f"fed.clients_per_round must be >= 0 (0: every client), got {per_round}")
  if not 0.0 <= prob < 1.0:
    raise ValueError(f"fed.dropout_prob must be in [0, 1), got {prob}")
  if limit < 0:
    raise ValueError(f"fed.max_bad_rounds must be >= 0 (0: never retire a client), got {limit}")
  if fed.aggregator == "centralized" and (per_round or prob):
    raise ValueError("fed.clients_per_round and fed.dropout_prob need a federated aggregator, not centralized "
                     "(one model trained on every client's data)")
  if per_round and jax.process_count() > 1:
    raise ValueError("fed.clients_per_round is for single-process runs (a multi-process run holds whole clients "
                     "per process): set it to 0")
