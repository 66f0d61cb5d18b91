"""Privacy at the split (docs/privacy.md): inversion of the boundary states, DP-SGD's clipping, the
accountant against dp-accounting and a hand-computed bound, and the boundary-noise defence."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fellrec_jax.federated import split_learning
from fellrec_jax.model import lora
from fellrec_jax.model import llama as model
from fellrec_jax.privacy import attacks
from fellrec_jax.privacy import defences
from fellrec_jax.privacy import inversion
from fellrec_jax.privacy import probe
from test_lora import randomize

LCFG = lora.LoraConfig(rank=4, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
CFG = model.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=8, initializer_range=0.1)  # k = 0: the server runs layer 0


@pytest.fixture(scope="module")
def tiny():
  base = model.init_params(CFG, jax.random.PRNGKey(0))
  adapters = randomize(lora.init_adapters(CFG, LCFG, jax.random.PRNGKey(1)), scale=0.2)
  return base, adapters


def examples(tokens, prefix_len=0) -> attacks.Examples:
  tokens = np.asarray(tokens, np.int32)
  valid = np.ones(tokens.shape, bool)
  private = valid & (np.arange(tokens.shape[1]) >= prefix_len)[None]
  n = len(tokens)
  return attacks.Examples(tokens, valid, private, np.zeros(tokens.shape, np.float32), ((0,),) * n,
                          np.zeros(n, np.int32))


def token_split(seed=0):
  """Public sequences over tokens [0, 40) and private ones over all 48: tokens 40..47 are held out."""
  rng = np.random.default_rng(seed)
  return examples(rng.integers(0, 40, (64, 16))), examples(rng.integers(0, 48, (16, 16)))


# ----------------------------------------------------------------------------------------------------
# Inversion


def test_nearest_neighbour_recovers_every_token_at_k0(tiny):
  base, adapters = tiny
  _, private = token_split()
  states = attacks.boundary_states(base, adapters, private, CFG, LCFG, k=0)
  np.testing.assert_array_equal(states, np.asarray(base["embed_tokens"]["embedding"])[private.tokens])
  h, t = attacks.token_features(states, private)
  assert inversion.nearest_neighbour_accuracy(h, t, base["embed_tokens"]["embedding"]) == 1.0


def test_learned_inverter_at_k0_is_perfect_on_seen_tokens_and_scored_on_held_out_prompts(tiny):
  """Trained on public sequences only: on the private prompts it recovers every token that public text
  contains and none of the 8 it never saw (so its score is on held-out data, not memorised)."""
  base, adapters = tiny
  public, private = token_split()
  pub_h, pub_t = attacks.token_features(attacks.boundary_states(base, adapters, public, CFG, LCFG, 0), public)
  priv_h, priv_t = attacks.token_features(attacks.boundary_states(base, adapters, private, CFG, LCFG, 0), private)
  inverter = inversion.learned_inverter(pub_h, pub_t, CFG.vocab_size, probe.ProbeConfig(steps=300, learning_rate=0.05))
  seen = priv_t < 40
  assert inversion.inverter_accuracy(inverter, priv_h[seen], priv_t[seen]) == 1.0
  assert inversion.inverter_accuracy(inverter, priv_h[~seen], priv_t[~seen]) == 0.0
  assert 0.7 < inversion.inverter_accuracy(inverter, priv_h, priv_t) < 0.9  # 40 of 48 tokens seen


def test_inversion_gets_harder_after_layers(tiny):
  base, adapters = tiny
  _, private = token_split()
  embedding = base["embed_tokens"]["embedding"]
  accuracy = [inversion.nearest_neighbour_accuracy(
      *attacks.token_features(attacks.boundary_states(base, adapters, private, CFG, LCFG, k), private), embedding)
      for k in (0, 1)]
  assert accuracy[0] == 1.0 and accuracy[1] < 1.0


def test_boundary_noise_reduces_inversion(tiny):
  """Nearest-neighbour inversion of the embeddings (k = 0) under noise of 0, 2 and 4 times the largest
  state's norm: 48 embeddings in 32 dimensions stay apart under little noise, not under that much."""
  base, adapters = tiny
  _, private = token_split()
  states = attacks.boundary_states(base, adapters, private, CFG, LCFG, 0)
  clip = float(np.linalg.norm(states, axis=-1).max())  # no clipping: only the noise acts
  accuracy = []
  for noise in (0.0, 2.0, 4.0):
    noisy = attacks.released(states, defences.Defences(boundary_clip=clip, boundary_noise=noise), seed=0)
    accuracy.append(inversion.nearest_neighbour_accuracy(*attacks.token_features(noisy, private),
                                                         base["embed_tokens"]["embedding"]))
  assert accuracy[0] == 1.0 > accuracy[1] > accuracy[2]
  assert accuracy[2] < 0.3  # measured 0.12; chance 1/48


def test_release_clips_each_token_and_adds_noise_of_the_stated_norm():
  states = np.random.default_rng(0).normal(size=(8, 20, 64)).astype(np.float32) * 3.0
  clipped = attacks.released(states, defences.Defences(boundary_clip=2.0), seed=0)
  np.testing.assert_allclose(np.linalg.norm(clipped, axis=-1), 2.0, rtol=1e-5)  # all norms were ~24 > 2
  noisy = attacks.released(states, defences.Defences(boundary_clip=2.0, boundary_noise=0.5), seed=0)
  # noise per token ~ N(0, (0.5 * 2 / 8)^2 I_64): its norm concentrates at 0.5 * 2 = 1 (std ~0.09)
  assert abs(np.linalg.norm(noisy - clipped, axis=-1).mean() - 1.0) < 0.03


# ----------------------------------------------------------------------------------------------------
# Defences in training


def packed_step():
  """Two rows of 12 tokens holding 4 examples (segments), a 3-token shared prefix, labels on 2-3 tokens."""
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, CFG.vocab_size, (2, 12)).astype(np.int32)
  segment_ids = np.array([[1] * 5 + [2] * 6 + [0], [1] * 7 + [2] * 3 + [0] * 2], np.int32)
  positions = np.zeros_like(tokens)
  for r in range(2):
    for s in (1, 2):
      where = segment_ids[r] == s
      positions[r, where] = 3 + np.arange(where.sum())
  loss_mask = ((segment_ids > 0) & (positions >= 5)).astype(np.float32)
  inputs = model.Inputs(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids),
                        jnp.asarray([1, 5, 9], jnp.int32))
  return inputs, jnp.asarray(loss_mask)


def split_config(d=defences.Defences(), k=0):
  return split_learning.SplitConfig(CFG, LCFG, k, defences=d)


_loss_and_grads = jax.jit(split_learning.loss_and_grads, static_argnames=("sc",))
_dp_step = jax.jit(split_learning.dp_step_loss_and_grads, static_argnames=("sc",))
_clipped_sum = jax.jit(defences.noisy_clipped_sum)


@pytest.fixture(scope="module")
def per_example(tiny):
  """Each example's (NLL sum, label count, gradient of the sum), from a row holding that example alone."""
  base, adapters = tiny
  inputs, loss_mask = packed_step()
  out = []
  for r in range(2):
    for s in (1, 2):
      single, mask = defences.one_example(inputs, loss_mask, r, s)
      out.append(_loss_and_grads(base, adapters, single, mask, jnp.zeros(3), split_config()))
  return out


def assert_trees_close(actual, expected):
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):  # float32 sums in another order
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


def test_examples_run_alone_add_up_to_the_packed_step(tiny, per_example):
  """DP-SGD's per-example gradients: the 4 examples of the packed rows, each run as a row of its own,
  give the engine's loss, label count and gradient of the whole step."""
  base, adapters = tiny
  inputs, loss_mask = packed_step()
  total, count, grads = _loss_and_grads(base, adapters, inputs, loss_mask, jnp.zeros(3), split_config())
  np.testing.assert_allclose(sum(e[0] for e in per_example), total, rtol=1e-5)
  assert sum(float(e[1]) for e in per_example) == float(count) == 13
  assert_trees_close(jax.tree.map(lambda *g: sum(g), *[e[2] for e in per_example]), grads)


def test_dp_sgd_step_is_the_mean_of_clipped_per_example_gradients(tiny, per_example):
  """No binding clip, no noise: the step's gradient (after the optimizer's division by the label count)
  is the mean over the 4 examples of each one's gradient of its mean label NLL."""
  base, adapters = tiny
  inputs, loss_mask = packed_step()
  sc = split_config(defences.Defences(dp_clip=1e6, examples_per_step=6))
  total, labels, grads = _dp_step(base, adapters, tuple(inputs[:3]) + (loss_mask,), inputs.prefix_tokens,
                                  jnp.zeros(3), sc, jax.random.key(0))
  assert float(labels) == 13
  mean = jax.tree.map(lambda *g: sum(g) / 4, *[jax.tree.map(lambda x: x / e[1], e[2]) for e in per_example])
  assert_trees_close(jax.tree.map(lambda g: g / labels, grads), mean)


def fake_gradients(count=5, seed=0):
  rng = np.random.default_rng(seed)
  return {"a": jnp.asarray(rng.normal(size=(count, 40, 3)), jnp.float32),
          "b": {"c": jnp.asarray(rng.normal(size=(count, 25)) * 5, jnp.float32)}}


def test_dp_sgd_clipping_bounds_each_examples_contribution():
  """Clip C: the sum over examples is sum_e g_e * min(1, C / |g_e|); replacing one example moves the sum
  by at most 2C, whatever its gradient; an invalid slot adds nothing."""
  grads = fake_gradients()
  norms = np.sqrt(sum(np.sum(np.square(x), axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(grads)))
  clip = float(np.median(norms))  # some examples are clipped, some not
  valid = jnp.asarray([True, True, True, True, False])
  summed = _clipped_sum(grads, valid, clip, 0.0, jax.random.key(0))
  factor = np.minimum(1.0, clip / norms) * np.asarray(valid)
  expected = jax.tree.map(lambda g: np.tensordot(factor, np.asarray(g), axes=1), grads)
  assert_trees_close(summed, expected)
  huge = jax.tree.map(lambda g: g.at[0].set(1e6 * g[1]), grads)  # example 0 replaced by a huge gradient
  moved = defences.global_norm(jax.tree.map(jnp.subtract, summed,
                                            _clipped_sum(huge, valid, clip, 0.0, jax.random.key(0))))
  assert 0 < float(moved) <= 2 * clip * (1 + 1e-5)


def test_dp_sgd_noise_has_the_stated_scale():
  grads = fake_gradients(count=3)
  valid = jnp.ones(3, bool)
  clean = _clipped_sum(grads, valid, 0.5, 0.0, jax.random.key(1))
  noisy = _clipped_sum(grads, valid, 0.5, 2.0, jax.random.key(1))
  noise = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(noisy), jax.tree.leaves(clean))])
  # 145 draws of N(0, (2 * 0.5)^2): the sample deviation is within 0.15 of 1 with probability > 0.99
  assert abs(noise.std() - 1.0) < 0.15 and abs(noise.mean()) < 0.3


def test_boundary_noise_changes_what_the_server_receives(tiny):
  """The server's layers run on noisy states (the loss changes); clipping that binds nothing and the
  noise's key change nothing else (the labels counted are the same)."""
  base, adapters = tiny
  inputs, loss_mask = packed_step()
  clean = _loss_and_grads(base, adapters, inputs, loss_mask, jnp.zeros(3), split_config())
  noisy = _loss_and_grads(base, adapters, inputs, loss_mask, jnp.zeros(3),
                          split_config(defences.Defences(boundary_clip=1e6, boundary_noise=1e5)), jax.random.key(0))
  assert float(noisy[1]) == float(clean[1])
  assert abs(float(noisy[0]) - float(clean[0])) > 1.0


def test_defence_settings_errors():
  with pytest.raises(ValueError, match="boundary_noise > 0 needs privacy.boundary_clip"):
    defences.Defences(boundary_noise=1.0)
  with pytest.raises(ValueError, match="dp_noise > 0 needs privacy.dp_clip"):
    defences.Defences(dp_noise=1.0)
  with pytest.raises(ValueError, match="privacy.dp_clip must be >= 0"):
    defences.Defences(dp_clip=-1.0)


# ----------------------------------------------------------------------------------------------------
# Accounting


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
  """The exact epsilon of one Gaussian mechanism of sensitivity 1 (Balle & Wang 2018, Theorem 8):
  delta(eps) = Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps sigma), solved by bisection."""
  phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))
  f = lambda eps: phi(0.5 / sigma - eps * sigma) - math.exp(eps) * phi(-0.5 / sigma - eps * sigma) - delta
  lo, hi = 0.0, 50.0
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
  return lo


def test_accountant_equals_the_librarys_for_the_same_parameters():
  dp_accounting = pytest.importorskip("dp_accounting")
  from fellrec_jax.privacy import accounting
  sigma, q, steps, delta = 1.1, 256 / 60000, 60 * 235, 1e-5
  accountant = dp_accounting.rdp.RdpAccountant(list(accounting.RDP_ORDERS))
  accountant.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
  assert accounting.dp_sgd_epsilon(sigma, q, steps, delta) == accountant.get_epsilon(delta)
  # Abadi et al.'s MNIST setting: the moments accountant gave ~2.9; Renyi DP with the tighter conversion less
  assert 2.0 < accounting.dp_sgd_epsilon(sigma, q, steps, delta) < 2.95


def test_accountant_on_one_gaussian_step_brackets_the_exact_epsilon():
  """q = 1, one step: the exact epsilon (analytic Gaussian) <= the RDP accountant's <= the classical RDP
  conversion min_a a / (2 sigma^2) + log(1/delta) / (a - 1) (hand-checkable: sigma = 1, delta = 1e-5)."""
  pytest.importorskip("dp_accounting")
  from fellrec_jax.privacy import accounting
  sigma, delta = 1.0, 1e-5
  exact = analytic_gaussian_epsilon(sigma, delta)
  classical = min(a / (2 * sigma ** 2) + math.log(1 / delta) / (a - 1) for a in accounting.RDP_ORDERS)
  eps = accounting.dp_sgd_epsilon(sigma, 1.0, 1, delta)
  assert 4.0 < exact < eps <= classical  # exact ~4.22; classical at a ~ 5.8: ~5.3
  assert eps - exact < 1.0
  assert accounting.dp_sgd_epsilon(0.0, 0.1, 10, delta) == math.inf
  with pytest.raises(ValueError, match="sampling rate"):
    accounting.dp_sgd_epsilon(1.0, 1.5, 10, delta)


def test_a_defended_run_trains_on_the_per_client_path():
  from fellrec_jax.federated import optimizer, training
  states = training.ClientStates({"a": jnp.zeros((2, 3))}, None, jnp.zeros((2, 2), jnp.uint32))
  lc = lambda d: training.LocalConfig(split_config(d), optimizer.OptimizerConfig())
  assert training.streams(lc(defences.Defences()), states)
  assert not training.streams(lc(defences.Defences(boundary_clip=1.0, boundary_noise=0.5)), states)
  assert not training.streams(lc(defences.Defences(dp_clip=1.0, examples_per_step=4)), states)
