"""The attacker's learned probe: a linear map from features to class scores (softmax), trained with Adam on
public data and applied to the client's private data. Features are standardised with the training set's
mean and deviation. Targets are one class per vector (int) or a distribution over classes (float [N, K],
e.g. uniform over a user's history items)."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  steps: int = 300  # Adam steps
  learning_rate: float = 1e-2
  batch: int = 4096  # feature vectors per step (all of them when fewer)
  seed: int = 0  # initialisation and minibatch order


class Probe(NamedTuple):
  mean: jax.Array  # [D]
  scale: jax.Array  # [D]
  kernel: jax.Array  # [D, K]
  bias: jax.Array  # [K]


def scores(probe: Probe, x) -> jax.Array:
  """Class scores [N, K] of features [N, D]."""
  return ((jnp.asarray(x, jnp.float32) - probe.mean) / probe.scale) @ probe.kernel + probe.bias


def _loss(params, mean, scale, x, targets):
  logits = scores(Probe(mean, scale, *params), x)
  if targets.ndim == 1:
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


@functools.partial(jax.jit, static_argnames=("tx",))
def _step(params, opt_state, mean, scale, x, targets, tx):
  loss, grads = jax.value_and_grad(_loss)(params, mean, scale, x, targets)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def fit(x, targets, num_classes: int, pc: ProbeConfig = ProbeConfig()) -> Probe:
  """A probe trained on features x [N, D] and their targets (int [N] or float [N, K])."""
  x = np.asarray(x, np.float32)
  targets = np.asarray(targets)
  if len(x) == 0:
    raise ValueError("a probe needs at least one training vector")
  mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
  params = (jnp.zeros((x.shape[1], num_classes), jnp.float32), jnp.zeros((num_classes,), jnp.float32))
  tx = optax.adam(pc.learning_rate)
  opt_state = tx.init(params)
  rng = np.random.default_rng(pc.seed)
  batch = min(pc.batch, len(x))
  for _ in range(pc.steps):
    index = rng.choice(len(x), batch, replace=False) if batch < len(x) else np.arange(len(x))
    params, opt_state, _ = _step(params, opt_state, mean, scale, x[index], targets[index], tx)
  return Probe(jnp.asarray(mean), jnp.asarray(scale), *params)


def top1_accuracy(score, truth) -> float:
  """Fraction of rows whose best-scored class is the true one."""
  if len(truth) == 0:
    return float("nan")
  return float(np.mean(np.argmax(np.asarray(score), axis=-1) == np.asarray(truth)))


def set_precision(score, truth_sets) -> float:
  """Mean over rows of |top-|S| classes ∩ S| / |S| (S: the row's true set, e.g. its history items)."""
  score = np.asarray(score)
  hits = [len(set(np.argsort(-s)[:len(t)].tolist()) & set(t)) / len(t) for s, t in zip(score, truth_sets) if t]
  return float(np.mean(hits)) if hits else float("nan")
