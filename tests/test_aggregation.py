"""Aggregation and heating against hand-computed values and a transcription of the reference loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fellrec_jax.federated import aggregation
from fellrec_jax.federated import heating


def hand_warm(losses, t, alpha, beta, tau=0.05):
  e = np.exp((np.array(losses) - max(losses)) / tau)
  p = e / e.sum()
  return np.array([math.tanh(alpha / p_i ** (t + 1 / beta)) for p_i in p])


def test_fellrec_matrix_on_a_hand_computed_example():
  # Client 0 and 1 point the same way (cos 1), client 2 is orthogonal to both (cos 0).
  theta = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
  losses = np.array([0.50, 0.55, 0.60])
  alpha, beta, t = 0.7, 5.0, 2
  # p = softmax(l / 0.05) = softmax([10, 11, 12]); w_i = tanh(0.7 / p_i ** 2.2), by hand:
  e = np.exp([10.0, 11.0, 12.0])
  p = e / e.sum()  # [0.0900, 0.2447, 0.6652]
  w = np.tanh(0.7 / p ** 2.2)
  assert np.allclose(w, [1.0, 1.0, np.tanh(0.7 / 0.66524 ** 2.2)], atol=1e-4)
  s = np.array([[1.0, 1.0, 0.5], [1.0, 1.0, 0.5], [0.5, 0.5, 1.0]])
  a = np.array([[1.0, s[0, 1] * w[0], s[0, 2] * w[0]],
                [s[1, 0] * w[1], 1.0, s[1, 2] * w[1]],
                [s[2, 0] * w[2], s[2, 1] * w[2], 1.0]])
  expected = a / a.sum(1, keepdims=True)
  got = aggregation.fellrec_matrix(theta, losses, t, alpha=alpha, beta=beta)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got).sum(1), 1.0, rtol=1e-6)


def test_struggling_client_takes_less_from_others_early():
  theta = np.random.RandomState(0).randn(4, 10)
  losses = np.array([1.0, 1.0, 1.0, 1.2])  # client 3 struggles
  early = aggregation.fellrec_matrix(theta, losses, 0, alpha=0.7, beta=1.0)
  late = aggregation.fellrec_matrix(theta, losses, 20, alpha=0.7, beta=1.0)
  assert early[3, 3] > early[0, 0]  # keeps more of itself
  assert late[3, 3] < early[3, 3]  # heating: takes more from the others as rounds pass
  np.testing.assert_allclose(hand_warm(losses, 0, 0.7, 1.0),
                             heating.warm_weights(losses, 0, alpha=0.7, beta=1.0), rtol=1e-5)


def test_beta_one_quirk_drops_the_warm_weight():
  theta = np.random.RandomState(1).randn(3, 5)
  losses = np.array([0.3, 0.9, 0.5])
  quirk = aggregation.fellrec_matrix(theta, losses, 0, alpha=0.7, beta=1, skip_warm_when_beta_is_1=True)
  s = np.asarray(aggregation.similarity(theta))
  np.testing.assert_allclose(quirk, s / s.sum(1, keepdims=True), rtol=1e-6)
  clean = aggregation.fellrec_matrix(theta, losses, 0, alpha=0.7, beta=1)
  assert not np.allclose(quirk, clean)


def reference_loop(theta, losses, round_index, alpha, beta, tau=0.05):
  """A direct transcription of the reference's softmax_with_temperature, cluster_clients and
  get_aggregate_lora_weight (numpy, in place, one client after another)."""
  x = np.array(losses) / tau
  e_x = np.exp(x - np.max(x))
  train_loss = e_x / e_x.sum()
  params = [row.copy() for row in np.asarray(theta, np.float64)]
  norms = np.linalg.norm(np.vstack(params), axis=1, keepdims=True)
  unit = np.vstack(params) / norms
  sim_matrix = (unit @ unit.T + 1) / 2
  for i in range(len(params)):
    weight = math.tanh(alpha / (train_loss[i] ** (round_index + 1 / beta)))
    for j in range(len(params)):
      if j != i and beta != 1:
        sim_matrix[i][j] = sim_matrix[i][j] * weight
    params[i][:] = sum(params[j] * sim_matrix[i][j] for j in range(len(params))) / sum(sim_matrix[i])
  return np.vstack(params)


@pytest.mark.parametrize("beta", [1, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_sequential_equals_the_reference_loop(beta, seed):
  rs = np.random.RandomState(seed)
  theta = rs.randn(5, 40)
  losses = rs.uniform(0.5, 1.0, 5)
  got = aggregation.fellrec_reference_sequential(theta, losses, 3, alpha=0.7, beta=beta)
  np.testing.assert_allclose(got, reference_loop(theta, losses, 3, 0.7, beta), rtol=2e-5, atol=1e-6)
  # Quirk (b) matters: the simultaneous update differs.
  simultaneous = aggregation.fellrec_matrix(theta, losses, 3, alpha=0.7, beta=beta,
                                            skip_warm_when_beta_is_1=True) @ theta
  assert not np.allclose(got, simultaneous, atol=1e-4)


def test_fedavg_is_the_sample_weighted_mean():
  theta = {"a": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])}
  mixed = aggregation.mix(theta, aggregation.fedavg_matrix([1, 1, 2]))
  np.testing.assert_allclose(mixed["a"], [[3.5, 4.5]] * 3)  # (1*1 + 1*3 + 2*5) / 4 = 3.5
  same = aggregation.mix(theta, aggregation.identity_matrix(3))
  np.testing.assert_array_equal(same["a"], theta["a"])


def test_heated_server_step_equals_the_mixing_matrix():
  rs = np.random.RandomState(2)
  tree = {"q": {"a": jnp.asarray(rs.randn(4, 3, 2)), "b": jnp.asarray(rs.randn(4, 2, 5))}}
  losses = jnp.asarray(rs.uniform(0.5, 1.5, 4))
  theta = aggregation.flatten_clients(tree)
  s = aggregation.similarity(theta)
  tx = heating.heated_server_step(alpha=0.7, beta=5.0)
  state = tx.init(tree)
  for t in range(3):  # the transformation counts rounds itself
    updates, state = tx.update(aggregation.pseudo_gradients(tree, s), state, tree, losses=losses, similarity=s)
    heated = optax.apply_updates(tree, updates)
    matrix = aggregation.fellrec_matrix(theta, losses, t, alpha=0.7, beta=5.0)
    expected = aggregation.mix(tree, matrix)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), heated, expected)
  assert int(state.round) == 3


def test_flatten_round_trip():
  tree = {"q": {"a": jnp.arange(24.0).reshape(2, 3, 4)}, "v": {"b": jnp.ones((2, 5))}}
  theta = aggregation.flatten_clients(tree)
  assert theta.shape == (2, 17)
  back = aggregation.unflatten_clients(theta, tree)
  jax.tree.map(np.testing.assert_array_equal, back, tree)
