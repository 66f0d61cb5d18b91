"""All clients' tokens as one stream (stream.py) give each client's numbers of the per-client computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fellrec_jax.federated import training
from fellrec_jax.model import kernels
from fellrec_jax.model import lora
from fellrec_jax.model import llama as model
from fellrec_jax.federated import optimizer
from fellrec_jax.federated import split_learning
from fellrec_jax.federated import stream

CFG = model.LlamaConfig(vocab_size=37, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                        num_kv_heads=2, head_dim=8, initializer_range=0.1)
R, T = 4, 16


def pack(steps, P, num_steps, rs):
  """[S, R, T] rows: each step's example lengths packed first-fit; masked steps full of garbage."""
  shape = (num_steps, R, T)
  tokens, positions, segments = (np.zeros(shape, np.int32) for _ in range(3))
  loss_mask = np.zeros(shape, np.float32)
  for s in range(num_steps):
    if s >= len(steps):  # garbage that a masked step must ignore
      tokens[s], segments[s], loss_mask[s] = rs.randint(3, CFG.vocab_size, (R, T)), 1, 1.0
      continue
    fill, count = [0] * R, [0] * R
    for n in steps[s]:
      r = next(r for r in range(R) if fill[r] + n <= T)
      span = slice(fill[r], fill[r] + n)
      count[r] += 1
      tokens[s, r, span] = rs.randint(3, CFG.vocab_size, n)
      positions[s, r, span] = P + np.arange(n)
      segments[s, r, span] = count[r]
      loss_mask[s, r, span] = (np.arange(n) >= (0 if P else 1)) * rs.randint(0, 2, n).clip(0, 1) + (np.arange(n) > n // 2)
      fill[r] += n
  return training.ClientBatches(tokens, positions, segments, np.minimum(loss_mask, 1.0),
                                 np.arange(num_steps) < len(steps))


def client_batches(P, seed=0):
  """Four clients, one or two steps: rows with up to three segments, a client without data."""
  rs = np.random.RandomState(seed)
  plans = [[[5, 4, 6], [3, 7]], [[9, 2, 3, 4, 7]], [], [[16], [2]]]
  return jax.tree.map(lambda *xs: np.stack(xs), *[pack(p, P, 2, rs) for p in plans])


def adapters_of(num_clients, lcfg, seed=1):
  one = lora.init_adapters(CFG, lcfg, jax.random.PRNGKey(seed))
  return jax.tree.map(lambda x: jnp.stack([x + 0.05 * (c + 1) * jax.random.normal(jax.random.PRNGKey(seed + c), x.shape)
                                           for c in range(num_clients)]), one)


@pytest.mark.parametrize("P,k,targets", [(6, 1, ("q_proj", "v_proj")), (0, 0, ("q_proj", "o_proj", "up_proj")),
                                         (1, 2, ("k_proj", "down_proj")), (6, 2, ("v_proj", "gate_proj"))])
def test_stream_equals_each_client_through_the_split(P, k, targets):
  """Prefix lengths 0, 1 and 6; every projection as a LoRA target; split points 0..L-1."""
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=targets)
  sc = split_learning.SplitConfig(CFG, lcfg, k)
  base = model.init_params(CFG, jax.random.PRNGKey(0))
  rs = np.random.RandomState(3)
  prefix = jnp.asarray(rs.randint(3, CFG.vocab_size, P), jnp.int32)
  prefix_mask = jnp.asarray(np.r_[0.0, rs.randint(0, 2, max(P - 1, 0))][:P], jnp.float32)
  batches = client_batches(P)
  adapters = adapters_of(4, lcfg)
  budget = stream.budgets(batches.segment_ids, batches.step_mask)
  one_client = jax.jit(lambda a, inputs, loss_mask: split_learning.loss_and_grads(base, a, inputs, loss_mask,
                                                                                   prefix_mask, sc))
  for s in range(2):
    step = jax.tree.map(lambda x: jnp.asarray(x[:, s]), batches)
    totals, counts, grads = jax.jit(lambda a, b, real: stream.loss_and_grads(
        base, a, b, real, prefix, prefix_mask, sc, budget))(adapters, tuple(step[:4]), step.step_mask)
    for c in range(4):
      if not bool(step.step_mask[c]):
        assert float(totals[c]) == 0.0 and float(counts[c]) == 0.0
        assert all(float(jnp.abs(g[c]).max()) == 0.0 for g in jax.tree.leaves(grads))
        continue
      inputs = model.Inputs(step.tokens[c], step.positions[c], step.segment_ids[c], prefix)
      total, count, g = one_client(jax.tree.map(lambda x: x[c], adapters), inputs, step.loss_mask[c])
      assert float(counts[c]) == float(count)
      np.testing.assert_allclose(totals[c], total, rtol=1e-5)
      for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(g)):
        np.testing.assert_allclose(got[c], want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))


def test_budgets_count_the_busiest_step_over_all_clients():
  segments = np.zeros((2, 3, 4, 8), np.int32)  # [C, S, R, T]
  segments[0, 0, 0, :5] = 1
  segments[1, 0, 0, :8] = 1
  segments[1, 0, 2, :3] = 1  # step 0: 16 tokens in 3 rows
  segments[0, 1, :, :] = 1  # step 1: 32 tokens in 4 rows, but only when the step is real
  step_mask = np.array([[True, False, True], [True, True, True]])
  assert stream.budgets(segments, step_mask) == stream.Budgets(16, 3)
  step_mask[0, 1] = True
  assert stream.budgets(segments, step_mask) == stream.Budgets(32, 4)
  assert stream.budgets(segments, step_mask, accum_steps=2) == stream.Budgets(16, 2)  # rows 0-1 of step 1
  assert [stream.round_up(n) for n in (1, 32, 33, 100, 1000, 1025)] == [1, 32, 34, 100, 1024, 1088]


def planned_sizes(batches, lc, count, waves=False):
  """(each step's size, the sizes): `count` sizes planned over the steps of `batches`, as a run plans them;
  with two or more, the steps must not all run at one size (else the test would not test sizes)."""
  needs = training.round_needs(batches, lc, waves=waves)
  size, sizes = training.step_sizes(needs, stream.plan_sizes(needs, count, min_gain=0))
  assert len(sizes) == count and len(set(np.asarray(size).tolist())) == count
  return size, sizes


@pytest.mark.parametrize("accum,prox,fresh,sizes", [(1, 0.0, True, 1), (2, 0.1, False, 1), (1, 0.0, False, 2)])
def test_streamed_round_equals_the_vmapped_round(accum, prox, fresh, sizes):
  """The streamed round, every step at one size or each at the smallest of two that holds it, gives the
  per-client vmap's adapters, optimizer state and losses."""
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj"))
  opt = optimizer.OptimizerConfig(learning_rate=5e-3, warmup_steps=1, fresh_each_round=fresh)
  lc = training.LocalConfig(split_learning.SplitConfig(CFG, lcfg, 1), opt, accum, prox)
  base = model.init_params(CFG, jax.random.PRNGKey(0))
  prefix, prefix_mask = jnp.arange(3, 9, dtype=jnp.int32), jnp.ones(6, jnp.float32).at[0].set(0.0)
  batches = client_batches(6, seed=1)
  adapters = adapters_of(4, lcfg)
  anchors = adapters_of(4, lcfg, seed=7) if prox else None
  ctx = training.RoundContext(jnp.int32(1), jnp.asarray([1.0, 0.5, 1.0, 2.0]))
  states = lambda: training.init_client_states(jax.tree.map(jnp.array, adapters), lc, jax.random.PRNGKey(4))
  size, planned = planned_sizes(batches, lc, sizes)
  got = training._streamed_round_jit(base, states(), batches, prefix, prefix_mask, anchors, ctx, size, lc=lc,
                                     sizes=planned)
  want = training._vmapped_round_jit(base, states(), batches, prefix, prefix_mask, anchors, ctx, lc=lc)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


def test_group_budgets_hold_every_step_of_their_group():
  """Each group's budget holds the most row tokens and non-empty rows any step of that group has."""
  rs = np.random.RandomState(3)
  segment_ids = rs.randint(0, 3, (5, 4, 2, 6)) * (rs.rand(5, 4, 2, 6) < 0.7)
  step_mask = rs.rand(5, 4) < 0.8
  bounds = stream.group_bounds(5, 2)
  assert bounds == [(0, 2), (2, 5)] and stream.group_bounds(1, 2) == [(0, 1)]
  for (a, b), budget in zip(bounds, stream.group_budgets(segment_ids, step_mask, groups=2)):
    valid = (segment_ids[a:b] > 0) & step_mask[a:b, :, None, None]
    assert budget.tokens >= valid.sum(axis=(0, 2, 3)).max()
    assert budget.rows >= valid.any(-1).sum(axis=(0, 2)).max()


def test_planned_sizes_pad_the_least_and_each_step_runs_at_the_smallest_that_holds_it():
  """Hand-computed: steps of 10, 10, 100, 100, 100 and 1,000 tokens (1,024 rounded up). Two sizes: {10, 10,
  100 x3} at 100 and {1,000} pad 5 x 100 + 1,024 = 1,524 tokens, less than any other cut (20 + 4 x 1,024);
  three: 10 / 100 / 1,024 (1,344), which saves 180 tokens, 2.9% of one size's 6 x 1,024: planned when a
  size must save 2% (the default), not when it must save 5%. A size holds the most rows of its steps too."""
  tokens, rows = [10, 10, 100, 100, 100, 1000], [1, 7, 2, 3, 2, 9]
  needs = np.stack([tokens, rows], axis=-1)[:, None]  # [S, G=1, 2]
  B = stream.Budgets
  assert stream.plan_sizes(needs, 1) == ((B(1024, 9),),)
  two = stream.plan_sizes(needs, 2)
  assert two == ((B(100, 7),), (B(1024, 9),))
  assert stream.plan_sizes(needs, 3, min_gain=0.05) == two  # the third size saves less than 5%
  assert stream.plan_sizes(needs, 3) == ((B(10, 7),), (B(100, 3),), (B(1024, 9),))
  assert stream.plan_sizes(needs, 8, min_gain=0) == stream.plan_sizes(needs, 3, min_gain=0)  # 3 distinct
  assert stream.plan_sizes(np.tile(needs[:1], (4, 1, 1)), 4) == ((B(10, 1),),)
  size, sizes = stream.size_of_steps(needs, two)
  assert size.tolist() == [0, 0, 0, 0, 0, 1] and sizes == two
  size, sizes = stream.size_of_steps(np.asarray([[[50, 8]], [[90, 2]], [[2000, 1]]]), two)
  assert size.tolist() == [1, 0, 1]  # 8 rows do not fit the first size; 2,000 tokens raise the largest
  assert sizes == ((B(100, 7),), (B(2048, 9),))
  groups = np.asarray([[[10, 1], [900, 4]], [[900, 4], [10, 1]]])  # two groups: each size holds both
  assert stream.plan_sizes(groups, 2) == ((B(928, 4), B(928, 4)),)  # 900 rounded up (round_up)


def test_round_needs_of_waves_are_taken_over_lanes():
  """Lanes: a wave's step holds the tokens of its V lanes, so its needs are its tokens and rows over its
  lanes (summing over the waves instead would be too small when W < V)."""
  rs = np.random.RandomState(5)
  W, V, R, T = 2, 6, 2, 8
  segment_ids = rs.randint(1, 3, (W, V, R, T)) * (rs.rand(W, V, R, T) < 0.9)
  step_mask = np.ones((W, V), bool)
  waves = training.ClientBatches(segment_ids, segment_ids, segment_ids, segment_ids, step_mask)
  lc = training.LocalConfig(split=None, optimizer=None, stream_groups=2)
  needs = training.stream_needs(waves, lc, waves=True)
  assert needs.shape == (W, 2, 2)
  for g, (a, b) in enumerate(stream.group_bounds(V, 2)):
    valid = segment_ids[:, a:b] > 0
    np.testing.assert_array_equal(needs[:, g, 0], valid.sum(axis=(1, 2, 3)))
    np.testing.assert_array_equal(needs[:, g, 1], valid.any(-1).sum(axis=(1, 2)))
  flat = training.stream_needs(waves, lc)  # the [C, S] reading: members = waves
  assert flat.shape == (V, 2, 2)


def _dropout_round(path, groups=1, lanes=0, seed=4, sizes=1):
  """One round of the four test clients with LoRA dropout 0.05 and two micro-batches per step by `path`:
  'streamed' (groups of streams, or lanes when `lanes`; each step at the smallest of `sizes` planned
  sizes) or 'vmapped' (the per-client reference)."""
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.05, targets=("q_proj", "v_proj", "down_proj"))
  opt = optimizer.OptimizerConfig(learning_rate=5e-3, warmup_steps=1)
  lc = training.LocalConfig(split_learning.SplitConfig(CFG, lcfg, 1), opt, accum_steps=2, stream_groups=groups,
                            streamed=path == "streamed")
  base = model.init_params(CFG, jax.random.PRNGKey(0))
  prefix, prefix_mask = jnp.arange(3, 9, dtype=jnp.int32), jnp.ones(6, jnp.float32).at[0].set(0.0)
  batches = client_batches(6, seed=1)
  ctx = training.RoundContext(jnp.int32(1), jnp.asarray([1.0, 0.5, 1.0, 2.0]))
  states = training.init_client_states(adapters_of(4, lcfg), lc, jax.random.PRNGKey(seed))
  planned = None
  if sizes > 1:
    schedule = training.lane_schedule(np.asarray(batches.step_mask).sum(axis=1), lanes) if lanes else None
    steps = training.arrange(batches, schedule) if lanes else batches
    planned = planned_sizes(steps, lc, sizes, waves=bool(lanes))[1]
  return training.local_round(base, states, batches, prefix, prefix_mask, None, ctx, lc=lc, lanes=lanes,
                              sizes=planned)


def _assert_same_round(got, want):
  """Float32 round-off of the rearranged sums: the tolerance of the no-dropout comparison above."""
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


@pytest.fixture(scope="module")
def streamed_with_dropout():
  return _dropout_round("streamed")


def test_streamed_round_with_dropout_draws_the_vmapped_rounds_masks(streamed_with_dropout):
  """LoRA dropout 0.05: the streamed round (every client's tokens in one stream) and the per-client vmap
  (`streamed=False`) draw the same masks, so losses and adapters agree; other keys give other masks."""
  _assert_same_round(streamed_with_dropout, _dropout_round("vmapped"))
  states, metrics = _dropout_round("streamed", seed=5)
  assert not np.allclose(metrics.train_loss, streamed_with_dropout[1].train_loss, rtol=1e-6, atol=0)
  q = lambda s: s.adapters["layers"]["self_attn"]["q_proj"]["lora_b"]
  assert not np.allclose(q(states), q(streamed_with_dropout[0]), rtol=1e-4, atol=0)


def test_dropout_masks_do_not_depend_on_how_clients_are_grouped(streamed_with_dropout):
  """One stream, two streams of two clients, and two lanes of clients in turn give the same round, each
  step at the smallest of two sizes that holds it (one size runs the same step: no switch around it)."""
  _assert_same_round(_dropout_round("streamed", lanes=2, sizes=2), streamed_with_dropout)
  _assert_same_round(_dropout_round("streamed", groups=2, sizes=2), streamed_with_dropout)

def test_dropout_masks_are_per_token_and_at_the_rate():
  """Each token's mask comes from its client's key and its id alone: the same token in another set of
  tokens gets the same mask; the rate is kept (inverted dropout) and tokens differ."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jnp.ones((6, 4000))
  owner, ids = jnp.asarray([0, 1, 2, 0, 1, 2]), jnp.asarray([0, 0, 0, 7, 7, 7])
  out = kernels.lora_dropout(x, kernels.DropoutKeys(keys, owner, ids), 0.25)
  alone = kernels.lora_dropout(x[:1], kernels.DropoutKeys(keys[2:], jnp.zeros(1, jnp.int32), ids[5:]), 0.25)
  np.testing.assert_array_equal(out[5], alone[0])
  assert set(np.unique(np.asarray(out)).tolist()) == {0.0, float(np.float32(4.0 / 3.0))}
  dropped = np.asarray(out) == 0
  np.testing.assert_allclose(dropped.mean(axis=1), 0.25, atol=0.03)  # 4.4 sigma of 4,000 draws
  assert len({tuple(row) for row in dropped}) == 6
  # Neighbouring features and tokens are independent: P(both dropped) = rate^2 (4.6 sigma of 24,000 pairs).
  assert abs(np.mean(dropped[:, 1:] & dropped[:, :-1]) - 0.25 ** 2) < 0.0075
  assert abs(np.mean(dropped[1:] & dropped[:-1]) - 0.25 ** 2) < 0.0075
