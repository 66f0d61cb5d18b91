"""Curriculum heating (docs/method.md §4): loss-dependent warm weights and the heated server step as an optax
transformation.

A struggling client (large training loss) gets a large loss weight p_i = softmax(l / tau)_i and hence a
small warm weight w_i = tanh(alpha / p_i ** (t + 1/beta)): early on it takes little from the others. As
the round t grows, p_i ** (t + 1/beta) -> 0 and w_i -> 1.

In server-optimizer form the FELLRec update of client i is theta_i <- theta_i - eta_i * g_i with the
pseudo-gradient g_i = theta_i - m_i (m_i: the similarity-weighted mean of the other clients) and the heated
server learning rate eta_i = w_i S_i / (1 + w_i S_i), S_i = sum_{j != i} s_ij.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def warm_weights(losses, round_index, *, alpha, beta, temperature=0.05):
  """w_i = tanh(alpha / p_i ** (t + 1/beta)), p = softmax(losses / temperature); computed in log space."""
  log_p = jax.nn.log_softmax(jnp.asarray(losses, jnp.float32) / temperature)
  exponent = jnp.asarray(round_index, jnp.float32) + 1.0 / jnp.asarray(beta, jnp.float32)
  return jnp.tanh(alpha * jnp.exp(-exponent * log_p))


class HeatState(NamedTuple):
  round: jax.Array  # int32: the communication round of the next update
  warm_weight: jax.Array  # [C] warm weights of the last update (1 before the first)


def heated_server_step(*, alpha, beta, temperature=0.05,
                       skip_warm_when_beta_is_1=False) -> optax.GradientTransformationExtraArgs:
  """Scale client pseudo-gradients by -eta_i, the heated per-client server learning rate.

  `update(pseudo_grads, state, params=None, *, losses, similarity)`: pseudo_grads is a client-stacked
  pytree (leading axis C), losses [C] the clients' mean training losses this round, similarity [C, C].
  """

  def init(params):
    num_clients = jax.tree.leaves(params)[0].shape[0]
    return HeatState(jnp.zeros((), jnp.int32), jnp.ones((num_clients,), jnp.float32))

  def update(updates, state, params=None, *, losses, similarity):
    del params
    w = warm_weights(losses, state.round, alpha=alpha, beta=beta, temperature=temperature)
    if skip_warm_when_beta_is_1 and beta == 1:
      w = jnp.ones_like(w)
    others = jnp.sum(similarity, axis=1) - jnp.diagonal(similarity)
    eta = w * others / (1.0 + w * others)
    scale = lambda g: -eta.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype) * g
    return jax.tree.map(scale, updates), HeatState(state.round + 1, w)

  return optax.GradientTransformationExtraArgs(init, update)
