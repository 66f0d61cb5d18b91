"""Server aggregation as pure functions on client-stacked pytrees (leading axis C).

Every aggregator is a row-stochastic mixing matrix A [C, C] applied as theta_i <- sum_j A_ij theta_j:
FELLRec's similarity/heat matrix (docs/method.md §4), FedAvg's sample-weighted mean, or the identity (local
training, centralized). The FELLRec update is also available in its heated server-optimizer form
(`heating.heated_server_step`) and as the reference's sequential in-place loop (quirk (b) of docs/method.md §4).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from fellrec_jax.federated import heating


def flatten_clients(tree):
  """[C, P] matrix of each client's flattened parameters (float32)."""
  return jax.vmap(lambda t: ravel_pytree(t)[0])(tree).astype(jnp.float32)


def unflatten_clients(theta_CxP, like):
  """Inverse of flatten_clients for a client-stacked pytree shaped like `like`."""
  _, unravel = ravel_pytree(jax.tree.map(lambda x: x[0], like))
  return jax.vmap(unravel)(theta_CxP)


def similarity(theta_CxP, include=None):
  """s_ij = (cos(theta_i, theta_j) + 1) / 2 with s_ii = 1 (a zero vector has cosine 0 to the others).

  include: [C] bool, the clients that take part in the aggregation; s_ij = 0 (i != j) when client i or j
  does not, so an excluded client neither gives nor takes anything (its row is the identity's).
  """
  norms = jnp.linalg.norm(theta_CxP, axis=1)
  unit = theta_CxP / jnp.where(norms > 0, norms, 1.0)[:, None]
  s = (unit @ unit.T + 1.0) / 2.0
  if include is not None:
    s = jnp.where(include[:, None] & include[None, :], s, 0.0)
  return jnp.where(jnp.eye(s.shape[0], dtype=bool), 1.0, s)


def masked_losses(losses, include=None):
  """Training losses for the warm weights: an excluded client's is -inf, so its softmax weight is 0 and the
  others' are a softmax over the included clients only (a non-finite loss never reaches the softmax)."""
  losses = jnp.asarray(losses, jnp.float32)
  return losses if include is None else jnp.where(include, losses, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("skip_warm_when_beta_is_1",))
def fellrec_matrix(theta, losses, round_index, include=None, *, alpha, beta, temperature=0.05,
                   skip_warm_when_beta_is_1=False):
  """FELLRec's row-normalised mixing matrix [C, C]: a_ii = 1, a_ij = s_ij * w_i, rows divided by their sum.

  theta: [C, P] flattened client parameters; losses: [C] mean training losses of the round; round_index: t;
  include: [C] bool, the clients aggregated (None: all); an excluded client's row and column are the identity's.
  With skip_warm_when_beta_is_1, beta == 1 drops w_i as the reference code does (quirk (a)).
  """
  s = similarity(jnp.asarray(theta, jnp.float32), include)
  w = heating.warm_weights(masked_losses(losses, include), round_index, alpha=alpha, beta=beta,
                           temperature=temperature)
  if skip_warm_when_beta_is_1:
    w = jnp.where(jnp.asarray(beta) == 1, 1.0, w)
  a = jnp.where(jnp.eye(s.shape[0], dtype=bool), 1.0, s * w[:, None])
  return a / jnp.sum(a, axis=1, keepdims=True)


@jax.jit
def fellrec_reference_sequential(theta, losses, round_index, include=None, *, alpha, beta, temperature=0.05):
  """The reference's update: clients updated one by one in place, so client i mixes the already-updated
  clients j < i (quirk (b)); similarities come from the round's parameters; beta == 1 skips w_i (quirk (a)).
  Returns the new [C, P] parameters (an excluded client's, `include` False, unchanged)."""
  theta = jnp.asarray(theta, jnp.float32)
  s = similarity(theta, include)
  w = heating.warm_weights(masked_losses(losses, include), round_index, alpha=alpha, beta=beta,
                           temperature=temperature)
  w = jnp.where(jnp.asarray(beta) == 1, 1.0, w)
  C = theta.shape[0]

  def update_client(i, theta):
    row = jnp.where(jnp.arange(C) == i, s[i], s[i] * w[i])
    return theta.at[i].set(row @ theta / jnp.sum(row))

  return jax.lax.fori_loop(0, C, update_client, theta)


def fedavg_matrix(num_examples, include=None):
  """Every row is the sample-weighted mean: a_ij = n_j / sum(n); with `include` [C] bool, the mean over the
  included clients, and an excluded client's row the identity's."""
  n = jnp.asarray(num_examples, jnp.float32)
  if include is None:
    return jnp.broadcast_to(n / jnp.sum(n), (n.shape[0], n.shape[0]))
  n = jnp.where(include, n, 0.0)
  rows = jnp.broadcast_to(n / jnp.maximum(jnp.sum(n), 1e-30), (n.shape[0], n.shape[0]))
  return jnp.where(include[:, None], rows, jnp.eye(n.shape[0], dtype=jnp.float32))


def identity_matrix(num_clients: int):
  return jnp.eye(num_clients, dtype=jnp.float32)


@jax.jit
def mix(tree, matrix_CxC):
  """theta_i <- sum_j A_ij theta_j for every leaf of a client-stacked pytree."""
  return jax.tree.map(
      lambda x: jnp.einsum("ij,j...->i...", matrix_CxC, x.astype(jnp.float32)).astype(x.dtype), tree)


def pseudo_gradients(tree, similarity_CxC):
  """g_i = theta_i - m_i, m_i = sum_{j != i} s_ij theta_j / sum_{j != i} s_ij (the heated step's input)."""
  off = jnp.where(jnp.eye(similarity_CxC.shape[0], dtype=bool), 0.0, similarity_CxC)
  total = jnp.sum(off, axis=1, keepdims=True)
  neighbours = off / jnp.where(total > 0, total, 1.0)  # a lone client has no neighbours: m_i = 0, eta_i = 0
  return jax.tree.map(lambda x: x - jnp.einsum("ij,j...->i...", neighbours, x.astype(jnp.float32)).astype(x.dtype),
                      tree)


# ----------------------------------------------------------------------------------------------------
# The server's aggregation step


@dataclasses.dataclass(frozen=True)
class AggregatorSpec:
  """Static description of the server's aggregation (hashable: a jit static argument)."""

  name: str  # fellrec | fedavg | fedprox | ditto | local | centralized
  alpha: float = 0.7
  beta: float = 1.0
  temperature: float = 0.05
  skip_warm_when_beta_is_1: bool = False  # reference quirk (a)
  sequential_update: bool = False  # reference quirk (b)
  server_layers: tuple[bool, ...] = ()  # per layer: held by the server
  shared_server_adapters: bool = False  # one middle-layer adapter set, sample-weighted mean of the clients'


def client_layers(tree, spec: AggregatorSpec):
  """The adapters of the layers a client holds (leaves [C, L, ...] -> [C, L_client, ...])."""
  keep = [i for i, server in enumerate(spec.server_layers) if not server]
  return jax.tree.map(lambda x: x[:, jnp.asarray(keep)], tree)


@functools.partial(jax.jit, static_argnames=("spec",))
def aggregate(adapters, train_loss, heat: heating.HeatState, round_index, num_examples, include=None, *,
              spec: AggregatorSpec):
  """(mixed adapters, mixing matrix [C, C] to log, new heat state, similarity [C, C]) of one round's
  aggregation; the similarity of the clients' adapters is FELLRec's s_ij (the identity for the others).

  include: [C] bool, the clients whose round counts (None: all). An excluded client (it failed to report,
  or its round went non-finite) neither gives nor takes: its row and column of the mixing are the
  identity's, it keeps `adapters`' row (which must be finite: its last good adapters) and its warm weight.
  """
  C = train_loss.shape[0]
  fedavg = fedavg_matrix(num_examples, include)
  kwargs = dict(alpha=spec.alpha, beta=spec.beta, temperature=spec.temperature)
  losses = masked_losses(train_loss, include)
  s = identity_matrix(C)
  old_warm = heat.warm_weight
  if spec.name == "fellrec":
    theta = flatten_clients(client_layers(adapters, spec) if spec.shared_server_adapters else adapters)
    s = similarity(theta, include)
    if spec.sequential_update:
      matrix = fellrec_matrix(theta, train_loss, round_index, include, skip_warm_when_beta_is_1=True, **kwargs)
      mixed = unflatten_clients(
          fellrec_reference_sequential(flatten_clients(adapters), train_loss, round_index, include, **kwargs),
          adapters)
      w = heating.warm_weights(losses, round_index, **kwargs)
      heat = heating.HeatState(heat.round + 1, jnp.where(spec.beta == 1, 1.0, w))
    else:
      matrix = fellrec_matrix(theta, train_loss, round_index, include,
                              skip_warm_when_beta_is_1=spec.skip_warm_when_beta_is_1, **kwargs)
      tx = heating.heated_server_step(skip_warm_when_beta_is_1=spec.skip_warm_when_beta_is_1, **kwargs)
      updates, heat = tx.update(pseudo_gradients(adapters, s), heat, adapters, losses=losses, similarity=s)
      mixed = optax.apply_updates(adapters, updates)
  elif spec.name in ("fedavg", "fedprox"):
    matrix = fedavg
    mixed = mix(adapters, matrix)
  else:  # local, centralized; ditto averages its global models with fedavg_matrix itself
    matrix = identity_matrix(C)
    mixed = adapters
  if spec.shared_server_adapters:
    server = jnp.asarray(spec.server_layers)
    averaged = mix(adapters, fedavg)
    mixed = jax.tree.map(lambda m, a: jnp.where(server.reshape((1, -1) + (1,) * (m.ndim - 2)), a, m), mixed, averaged)
  if include is not None:
    mixed = keep_excluded(mixed, adapters, include)
    heat = heat._replace(warm_weight=jnp.where(include, heat.warm_weight, old_warm))
  return mixed, matrix, heat, s


def keep_excluded(new, old, include):
  """`new` for the included clients, `old` (bit for bit) for the others ([C, ...] pytrees, include [C])."""
  pick = lambda n, o: jnp.where(include.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
  return jax.tree.map(pick, new, old)
