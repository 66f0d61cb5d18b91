"""Local training: equals plain centralized LoRA fine-tuning, masked steps are no-ops, vmap == one by one."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fellrec_jax.federated import training
from fellrec_jax.model import lora
from fellrec_jax.model import llama as model
from fellrec_jax.federated import optimizer
from fellrec_jax.federated import split_learning

P, T, R = 6, 16, 4  # prefix length, row length, rows per step
CFG = model.LlamaConfig(vocab_size=37, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                        num_kv_heads=2, head_dim=8, initializer_range=0.1)
LCFG = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj"))
OPT = optimizer.OptimizerConfig(learning_rate=5e-3, warmup_steps=2, max_grad_norm=1.0)


def local_config(k=1, accum=1, opt=OPT, prox=0.0, lcfg=LCFG, groups=1):
  return training.LocalConfig(split_learning.SplitConfig(CFG, lcfg, k), opt, accum, prox, groups)


@pytest.fixture(scope="module")
def world():
  return make_world()


def make_world():
  rs = np.random.RandomState(0)
  base = model.init_params(CFG, jax.random.PRNGKey(0))
  prefix = rs.randint(3, CFG.vocab_size, P).astype(np.int32)
  prefix_mask = np.r_[0.0, np.ones(P - 1)].astype(np.float32)
  examples = []
  for n in rs.randint(3, 8, 12):
    toks = rs.randint(3, CFG.vocab_size, n).astype(np.int32)
    examples.append((toks, (np.arange(n) >= 1).astype(np.float32)))
  return base, prefix, prefix_mask, examples


def pack_steps(steps, num_steps):
  """Pack each step's examples into R rows of T tokens (first fit); steps beyond the data are masked."""
  arrays = {k: np.zeros((num_steps, R, T), np.int32) for k in ("tokens", "positions", "segment_ids")}
  loss_mask = np.zeros((num_steps, R, T), np.float32)
  for s, examples in enumerate(steps):
    fill = [0] * R
    segs = [0] * R
    for toks, mask in examples:
      r = next(r for r in range(R) if fill[r] + len(toks) <= T)
      sl = slice(fill[r], fill[r] + len(toks))
      segs[r] += 1
      arrays["tokens"][s, r, sl], arrays["positions"][s, r, sl] = toks, np.arange(P, P + len(toks))
      arrays["segment_ids"][s, r, sl], loss_mask[s, r, sl] = segs[r], mask
      fill[r] += len(toks)
  step_mask = np.arange(num_steps) < len(steps)
  return training.ClientBatches(arrays["tokens"], arrays["positions"], arrays["segment_ids"], loss_mask, step_mask)


def stack_clients(*batches):
  return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def fresh_adapters(num_clients, seed=1):
  adapters = lora.init_adapters(CFG, LCFG, jax.random.PRNGKey(seed))
  # Non-zero B so that every adapter leaf gets a gradient from the first step.
  adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape), adapters)
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients, *x.shape)), adapters)


def run_round(base, prefix, prefix_mask, adapters, batches, lc, warmup=2, lr_scale=None, sequential=False, lanes=0):
  copy = lambda tree: jax.tree.map(jnp.array, tree)  # local_round donates the states it is given
  states = training.init_client_states(copy(adapters), lc, jax.random.PRNGKey(9))
  num_clients = batches.step_mask.shape[0]
  ctx = training.RoundContext(jnp.int32(warmup), jnp.ones(num_clients) if lr_scale is None else lr_scale)
  anchors = copy(adapters) if lc.prox_mu else None
  if sequential:
    return training.sequential_local_round(base, states, batches, prefix, prefix_mask, anchors, ctx, lc=lc)
  return training.local_round(base, states, batches, prefix, prefix_mask, anchors, ctx, lc=lc, lanes=lanes)


def padded_rows(examples, prefix, prefix_mask):
  """(ids, labels, attention mask) of examples as right-padded rows [prefix + tokens], one each."""
  length = P + max(len(t) for t, _ in examples)
  ids = np.zeros((len(examples), length), np.int32)
  labels = np.zeros((len(examples), length), np.float32)
  attn = np.zeros_like(ids)
  for i, (toks, mask) in enumerate(examples):
    n = P + len(toks)
    ids[i, :n], labels[i, :n], attn[i, :n] = np.r_[prefix, toks], np.r_[prefix_mask, mask], 1
  return ids, labels, attn


def plain_nll(base, adapters, ids, labels, attn):
  """(sum, count) of the labelled tokens' NLL, labels shifted as in transformers."""
  logits = model.forward(base, adapters, model.plain_inputs(ids, attn), CFG, LCFG)
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], -1)[..., 0]
  return jnp.sum(nll * labels[:, 1:]), labels[:, 1:].sum()


def plain_training(base, prefix, prefix_mask, steps, adapters, opt=OPT):
  """Centralized LoRA fine-tuning written plainly: full sequences, one row each, optax.adamw."""
  total_steps, warmup = len(steps), opt.warmup_steps
  schedule = lambda c: opt.learning_rate * jnp.where(
      c < warmup, c / warmup, jnp.maximum(0.0, (total_steps - c) / (total_steps - warmup)))
  tx = optax.chain(optax.clip_by_global_norm(opt.max_grad_norm),
                   optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=0.0))
  state = tx.init(adapters)

  def loss_fn(adapters, ids, labels, attn):
    total, count = plain_nll(base, adapters, ids, labels, attn)
    return total / count

  @jax.jit  # one program per step shape (op by op, this reference spent ~20 s compiling primitives)
  def step(adapters, state, ids, labels, attn):
    loss, grads = jax.value_and_grad(loss_fn)(adapters, ids, labels, attn)
    updates, state = tx.update(grads, state, adapters)
    return optax.apply_updates(adapters, updates), state, loss

  losses = []
  for examples in steps:
    adapters, state, loss = step(adapters, state, *padded_rows(examples, prefix, prefix_mask))
    losses.append(float(loss))
  return adapters, float(np.mean(losses))


@pytest.mark.parametrize("k,accum", [(1, 1), (0, 2), (2, 4)])
def test_one_client_equals_plain_centralized_lora_finetuning(world, k, accum):
  base, prefix, prefix_mask, examples = world
  steps = [examples[0:4], examples[4:8], examples[8:11], examples[11:12]]
  adapters = fresh_adapters(1)
  states, metrics = run_round(base, prefix, prefix_mask, adapters, stack_clients(pack_steps(steps, 4)),
                              local_config(k, accum))
  expected, expected_loss = plain_training(base, prefix, prefix_mask, steps, jax.tree.map(lambda x: x[0], adapters))
  moved = max(float(jnp.abs(a[0] - b[0]).max()) for a, b in zip(jax.tree.leaves(states.adapters),
                                                                jax.tree.leaves(adapters)))
  assert moved > 1e-3  # training did something
  for got, want in zip(jax.tree.leaves(states.adapters), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got[0], want, rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(metrics.train_loss[0], expected_loss, rtol=1e-5)
  assert int(metrics.num_steps[0]) == 4


def test_masked_steps_and_clients_are_exact_no_ops(world):
  base, prefix, prefix_mask, examples = world
  steps = [examples[0:4], examples[4:8]]
  lc = local_config(opt=optimizer.OptimizerConfig(learning_rate=5e-3, warmup_steps=0, fresh_each_round=False))
  adapters = fresh_adapters(3)
  batches = stack_clients(pack_steps(steps[:1], 5), pack_steps(steps, 5), pack_steps([], 5))
  short, _ = run_round(base, prefix, prefix_mask, jax.tree.map(lambda x: x[:1], adapters),
                       stack_clients(pack_steps(steps, 2)), lc)
  states, metrics = run_round(base, prefix, prefix_mask, adapters, batches, lc)
  # Client 1 has the same two steps followed by three masked ones: the same result as two steps alone.
  for a, b in zip(jax.tree.leaves((states.adapters, states.opt_state)), jax.tree.leaves((short.adapters, short.opt_state))):
    np.testing.assert_allclose(a[1], b[0], rtol=1e-4, atol=1e-7)
  # Masked steps are exact no-ops whatever they hold: garbage in them changes no bit.
  rs = np.random.RandomState(5)
  garbage = batches._replace(
      tokens=np.where(batches.step_mask[..., None, None], batches.tokens, rs.randint(3, CFG.vocab_size, batches.tokens.shape)),
      segment_ids=np.where(batches.step_mask[..., None, None], batches.segment_ids, 1),
      loss_mask=np.where(batches.step_mask[..., None, None], batches.loss_mask, 1.0).astype(np.float32))
  noisy, noisy_metrics = run_round(base, prefix, prefix_mask, adapters, garbage, lc)
  for a, b in zip(jax.tree.leaves((states, metrics)), jax.tree.leaves((noisy, noisy_metrics))):
    np.testing.assert_array_equal(a, b)
  # Client 2 has no data this round: nothing changes, not even the optimizer's step count.
  for a, b in zip(jax.tree.leaves(states.adapters), jax.tree.leaves(adapters)):
    np.testing.assert_array_equal(a[2], b[2])
  initial = jax.vmap(optimizer.transform(lc.optimizer).init)(adapters)
  for a, b in zip(jax.tree.leaves(states.opt_state), jax.tree.leaves(initial)):
    np.testing.assert_array_equal(a[2], b[2])
  assert metrics.num_steps.tolist() == [1, 2, 0] and float(metrics.train_loss[2]) == 0.0


@pytest.mark.parametrize("lanes,fresh,groups", [(0, True, 1), (2, False, 1), (1, True, 1), (0, True, 2),
                                                (2, True, 2)])
def test_vmapped_round_equals_clients_one_by_one(world, lanes, fresh, groups):
  """All clients in one vmap (lanes=0), or fewer lanes each training several clients in turn, with the
  clients' tokens in one stream or in `groups` streams, give the numbers of the one-client-at-a-time path."""
  base, prefix, prefix_mask, examples = world
  batches = stack_clients(pack_steps([examples[0:4], examples[4:8], examples[8:10]], 3),
                          pack_steps([examples[10:12]], 3),
                          pack_steps([examples[2:5], examples[7:11]], 3))
  opt = optimizer.OptimizerConfig(learning_rate=5e-3, warmup_steps=1, fresh_each_round=fresh)
  lc = local_config(1, 2, opt=opt, groups=groups)
  adapters = fresh_adapters(3)
  lr_scale = jnp.array([1.0, 0.5, 0.8])
  vmapped, m1 = run_round(base, prefix, prefix_mask, adapters, batches, lc, lr_scale=lr_scale, lanes=lanes)
  one_by_one, m2 = run_round(base, prefix, prefix_mask, adapters, batches, lc, lr_scale=lr_scale, sequential=True)
  for a, b in zip(jax.tree.leaves(vmapped), jax.tree.leaves(one_by_one)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m1.train_loss, m2.train_loss, rtol=1e-6)
  assert m1.num_steps.tolist() == m2.num_steps.tolist() == [3, 1, 2]


def test_lane_schedule_balances_and_covers_every_step():
  steps = [7, 2, 5, 0, 3]
  schedule = training.lane_schedule(steps, lanes=2)
  assert schedule.client.shape == (9, 2)  # loads: 7+2 and 5+3, longest first
  for c, n in enumerate(steps):
    slots = schedule.active & (schedule.client == c)
    assert slots.sum() == n and sorted(schedule.step[slots].tolist()) == list(range(n))
    assert (schedule.first & slots).sum() == (n > 0) and (schedule.last & slots).sum() == (n > 0)
  full = training.lane_schedule(steps)
  assert full.client.shape == (7, 5) and full.client[0].tolist() == [0, 1, 2, 0, 4]


def test_dropout_makes_clients_differ_and_is_reproducible(world):
  base, prefix, prefix_mask, examples = world
  batches = stack_clients(*[pack_steps([examples[0:4]], 1)] * 2)
  lc = local_config(lcfg=lora.LoraConfig(rank=4, alpha=8.0, dropout=0.3, targets=("q_proj", "v_proj")))
  a, _ = run_round(base, prefix, prefix_mask, fresh_adapters(2), batches, lc, warmup=0)
  b, _ = run_round(base, prefix, prefix_mask, fresh_adapters(2), batches, lc, warmup=0)
  leaf_a, leaf_b = jax.tree.leaves(a.adapters)[1], jax.tree.leaves(b.adapters)[1]
  np.testing.assert_array_equal(leaf_a, leaf_b)  # same keys, same numbers
  assert not np.allclose(leaf_a[0], leaf_a[1])  # per-client keys differ


def test_proximal_term_pulls_towards_the_anchor(world):
  base, prefix, prefix_mask, examples = world
  batches = stack_clients(pack_steps([examples[0:4], examples[4:8], examples[8:12]], 3))
  adapters = fresh_adapters(1)
  distance = lambda s: sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(s.adapters),
                                                                         jax.tree.leaves(adapters)))
  free, _ = run_round(base, prefix, prefix_mask, adapters, batches, local_config())
  prox, _ = run_round(base, prefix, prefix_mask, adapters, batches, local_config(prox=50.0))
  assert distance(prox) < 0.5 * distance(free)


def test_validation_nll_matches_the_plain_loss(world):
  base, prefix, prefix_mask, examples = world
  steps = [examples[0:4], examples[4:7]]
  adapters = fresh_adapters(1)
  total, count = training.validation_nll(base, adapters, stack_clients(pack_steps(steps, 3)), prefix, prefix_mask,
                                          lc=local_config())
  # Every example as its own row, in one compiled program (op by op, one row at a time: ~15 s of compiling).
  plain_total, plain_count = jax.jit(plain_nll)(base, jax.tree.map(lambda x: x[0], adapters),
                                                *padded_rows([e for step in steps for e in step], prefix, prefix_mask))
  np.testing.assert_allclose(total[0], plain_total, rtol=1e-5)
  assert float(count[0]) == float(plain_count)


def test_boundary_bytes_count_the_four_crossings():
  sc = split_learning.SplitConfig(CFG, LCFG, 1)
  assert split_learning.boundary_bytes(R, T, P, sc) == 4 * (R * T + P) * CFG.hidden_size * 4
  assert split_learning.boundary_bytes(R, T, P, split_learning.SplitConfig(CFG, LCFG, 2)) == 0  # no server layers


SHARDED_SCRIPT = """
import sys
sys.path.insert(0, "tests")
import jax, numpy as np
from test_federated import make_world, pack_steps, stack_clients, fresh_adapters, local_config, run_round
from fellrec_jax.federated import training
from fellrec_jax.federated import sharding
base, prefix, prefix_mask, examples = make_world()
C = 4
small = [[[examples[c]]] for c in range(2)]
large = [[examples[c:c + 3], examples[c + 4:c + 7]] for c in range(2, 4)]  # shard 1 has more tokens a step
batches = stack_clients(*[pack_steps(steps, 2) for steps in small + large])
lc = local_config(groups=int(sys.argv[1]))
adapters = fresh_adapters(C)
one, one_metrics = run_round(base, prefix, prefix_mask, adapters, batches, lc)
mesh = sharding.make_mesh(clients=2)
put = lambda tree: sharding.put_clients(tree, mesh)
states = put(training.init_client_states(jax.tree.map(np.array, adapters), lc, jax.random.PRNGKey(9)))  # as a run
assert training.client_mesh(states) is mesh and training.streams(lc, states)
ctx = training.RoundContext(np.int32(2), put(np.ones(C, np.float32)))
two, two_metrics = training.local_round(sharding.replicate(base, mesh), states, put(batches), prefix, prefix_mask,
                                         None, ctx, lc=lc)
assert len(jax.tree.leaves(two.adapters)[0].sharding.device_set) == 2
for a, b in zip(jax.tree.leaves((one.adapters, one_metrics)), jax.tree.leaves((two.adapters, two_metrics))):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
# A round fed the previous round's states (placed as jit places its outputs) runs the same program.
compiled = training._sharded_streamed_round_jit._cache_size()
training.local_round(sharding.replicate(base, mesh), two, put(batches), prefix, prefix_mask, None, ctx, lc=lc)
assert training._sharded_streamed_round_jit._cache_size() == compiled, "the second round compiled again"
print("OK")
"""


@pytest.mark.parametrize("groups", [1, 2])
def test_streamed_round_on_a_client_mesh_equals_one_device(groups):
  """Client state sharded over 2 devices: each streams its own clients (shard_map), the numbers are one
  device's (the second device's clients have more tokens a step: its stream budgets must be the ones used)."""
  root = Path(__file__).resolve().parents[1]
  env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu", "NPROC": "8",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  run = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(groups)], env=env, cwd=root, capture_output=True,
                       text=True, timeout=600)
  assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]
