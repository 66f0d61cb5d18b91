"""Who takes part in a round: sampled participants, clients that fail to report, non-finite clients and
their retirement, the summarised metrics of many clients, and resuming such a run (docs/method.md §4,
"Participation and faults")."""

import dataclasses
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from fellrec_jax.data import batching
from fellrec_jax.federated import aggregation
from fellrec_jax.federated import heating
from fellrec_jax.federated import participation
from fellrec_jax.federated import training
from fellrec_jax.run import checkpoint
from fellrec_jax.run import round_records
from fellrec_jax.run import rounds
from fellrec_jax.run import setup as setup_lib
from fellrec_jax.run import state as state_lib
from fellrec_jax.run import train

NUM_CLIENTS, PER_ROUND = 4, 2


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """One set-up run (data, base model) shared by the tests; each varies only the participation fields.

  The tests run round 0 only (its participants and batches: one compilation serves them all)."""
  config = default.get_config("smoke")
  config.eval.at_end = False
  config.fed.num_clients = NUM_CLIENTS
  config.fed.rounds = 3
  config.fed.clients_per_round = PER_ROUND
  config.fed.clients_per_chunk = 0
  config.pretrain.steps = 2
  config.model.num_layers = 2
  return setup_lib.setup(config, tmp_path_factory.mktemp("participation"))


def variant(run, **fed):
  config = run.config.copy_and_resolve_references()
  for key, value in fed.items():
    node, leaf = (config.log, key[4:]) if key.startswith("log_") else (config.fed, key)
    node[leaf] = value
  return dataclasses.replace(run, config=config)


def host(tree):
  return jax.tree.map(np.asarray, tree)


def rows(tree, index):
  return jax.tree.map(lambda x: x[index], tree)


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def valid_batches(run):
  return rounds.validation_data(run)


def one_round(run, round_index=0, state=None):
  """(adapters before, state after, record) of one round from a fresh state (or `state`)."""
  state = state_lib.init_state(run) if state is None else state
  before = host(state.clients.adapters)
  state, record = rounds.run_round(run, state, round_index, valid_batches(run))
  return before, state, record


@pytest.fixture
def quick(monkeypatch):
  """Local training replaced by a cheap deterministic update of each client's adapters (from its own data):
  the tests of who takes part need no model compilation; one test below trains for real."""

  def train_clients(run, clients, batches, anchors, ctx):
    train_clients.batches = batches
    tokens = jnp.asarray(batches.tokens, jnp.float32).reshape(batches.tokens.shape[0], -1)
    shift = 1e-3 * (1.0 + jnp.mean(tokens, axis=1) / 100.0)
    moved = jax.tree.map(lambda x: x + shift.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype), clients.adapters)
    steps = jnp.sum(jnp.asarray(batches.step_mask, jnp.int32), axis=1)
    metrics = training.ClientMetrics(2.0 + shift, steps, 10.0 * steps.astype(jnp.float32))
    rng = jax.vmap(lambda k: jax.random.split(k)[0])(clients.rng)
    return training.ClientStates(moved, clients.opt_state, rng), metrics

  monkeypatch.setattr(rounds, "train_clients", train_clients)
  return train_clients


def sampled(run, round_index):
  return participation.sample_participants(run.config.seed, round_index, np.ones(NUM_CLIENTS, bool), PER_ROUND)


def poison(monkeypatch, client: int):
  """Client `client`'s local round ends with NaN adapters and loss (whenever it takes part)."""
  real_train, real_roster = rounds.train_clients, rounds.round_roster
  current = {}

  def round_roster(run, state, round_index):
    current["roster"] = real_roster(run, state, round_index)
    return current["roster"]

  def train_clients(run, clients, batches, anchors, ctx):
    trained, metrics = real_train(run, clients, batches, anchors, ctx)
    where = np.flatnonzero(current["roster"].participants == client)
    if len(where):
      nan = lambda x: x.at[int(where[0])].set(jnp.nan)
      trained = trained._replace(adapters=jax.tree.map(nan, trained.adapters))
      metrics = metrics._replace(train_loss=nan(metrics.train_loss))
    return trained, metrics

  monkeypatch.setattr(rounds, "round_roster", round_roster)
  monkeypatch.setattr(rounds, "train_clients", train_clients)


# ----------------------------------------------------------------------------------------------------
# Sampling (host-side)


def test_participants_are_seeded_without_replacement_and_skip_retired_clients():
  eligible = np.ones(10, bool)
  first = participation.sample_participants(0, 3, eligible, 4)
  assert len(set(first.tolist())) == 4 and np.all(np.diff(first) > 0)
  np.testing.assert_array_equal(first, participation.sample_participants(0, 3, eligible, 4))
  draws = {tuple(participation.sample_participants(0, r, eligible, 4)) for r in range(20)}
  assert len(draws) > 10  # a new draw every round
  eligible[first] = False
  assert not set(participation.sample_participants(0, 3, eligible, 4)) & set(first.tolist())
  np.testing.assert_array_equal(participation.sample_participants(0, 3, eligible, 0), np.flatnonzero(eligible))


def test_a_clients_failure_does_not_depend_on_who_else_takes_part():
  every = participation.sample_dropped(7, 2, np.arange(50), 50, 0.3)
  some = np.asarray([3, 17, 40])
  np.testing.assert_array_equal(participation.sample_dropped(7, 2, some, 50, 0.3), every[some])
  assert 5 < every.sum() < 25  # about 15 of 50
  assert not participation.sample_dropped(7, 2, some, 50, 0.0).any()


def test_padded_lane_schedules_take_few_shapes():
  """With lanes, any m participants' schedule fits max_waves; the padded schedule has a bucket's waves (a
  few shapes over all rounds, at most a few idle waves more), the padding idle."""
  rng = np.random.default_rng(0)
  steps = rng.integers(0, 7, 400).astype(np.int32)
  bound = rounds.max_waves(steps, 100, 3)
  config = default.get_config("smoke")
  config.fed.clients_per_round = 100
  run = SimpleNamespace(config=config, num_train_clients=400, lanes=3, train_plan=SimpleNamespace(client_steps=steps),
                        round_shapes=None)
  shapes = set()
  for _ in range(50):
    subset = np.sort(rng.choice(400, 100, replace=False))
    plain = training.lane_schedule(steps[subset], 3)
    assert plain.client.shape[0] <= bound
    step_mask = np.arange(steps.max())[None, :] < steps[subset][:, None]
    padded = rounds.lane_schedule(run, SimpleNamespace(step_mask=step_mask))
    waves = len(plain.client)
    assert waves <= padded.client.shape[0] <= min(bound, max(waves * 17 // 16 + 1, -(-waves // 8) * 8))
    shapes.add(padded.client.shape)
    for got, want in zip(padded, plain):
      np.testing.assert_array_equal(got[:waves], want)
      assert not got[waves:].any()
  assert len(shapes) <= 6 and all(w % 8 == 0 or w == bound for w, _ in shapes)  # 50 rounds, a few compilations


def used_rows(batches) -> np.ndarray:
  """int [C]: the rows each client's packed steps use at most (a used row starts with a token of segment 1)."""
  return np.asarray(batches.segment_ids[:, :, :, 0] > 0).sum(axis=2).max(axis=1)


def test_validation_rows_are_those_the_packed_batches_use(base_run):
  """Validation.rows, from the plan's lengths, equal the rows every client's packed batches really use."""
  run = variant(base_run, clients_per_chunk=1)
  valid = rounds.validation_data(run)
  assert valid.held is None  # by chunks: nothing held, each call packs its clients
  packed = run.data.valid_batches()
  np.testing.assert_array_equal(valid.rows, used_rows(packed))
  assert valid.rows.max() == valid.plan.rows_per_step > 1


def test_validation_by_chunks_keeps_only_the_rows_its_clients_use(base_run, monkeypatch):
  """Every client's validation batches are padded to the largest client's rows; clients are validated in
  groups of the rows they use (rounded up to a power of two), each call keeping those rows and as many
  clients as the rows of `clients_per_chunk` padded clients allow. The losses are those of the whole
  padded batches, up to float32 reduction order over fewer zeros, in the order the clients were asked,
  whether a call cuts them from batches held or packs them from the plan."""
  run = variant(base_run, clients_per_chunk=1)
  valid = jax.tree.map(np.array, rounds.client_data(run, run.data.valid_batches, run.num_clients))
  R = valid.tokens.shape[2]
  assert R > 1
  for field in ("tokens", "positions", "segment_ids", "loss_mask"):  # clients 0 and 2 keep their first row only
    getattr(valid, field)[[0, 2], :, 1:] = 0
  np.testing.assert_array_equal(used_rows(valid)[[0, 2]], 1)
  valid = rounds.Validation(run.data.valid_plan, used_rows(valid), jax.tree.map(jnp.asarray, valid))
  adapters = state_lib.init_state(run).clients.adapters
  keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(adapters))))
  adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape, x.dtype), adapters)
  calls, validate = [], training.validation_nll

  def recording(base, adapters, batches, *args, **kwargs):
    calls.append((batches.tokens.shape[2], np.asarray(batches.tokens)[np.asarray(batches.step_mask)[:, 0]]))
    return validate(base, adapters, batches, *args, **kwargs)

  monkeypatch.setattr(training, "validation_nll", recording)
  chunked = rounds.validation_losses(run, adapters, valid)
  buckets = [rounds.row_bucket(int(r), R) for r in valid.rows]
  for rows in set(buckets):  # each client once, in calls of its group, as few as R rows a call allow
    counts = [len(tokens) for r, tokens in calls if r == rows]
    per_call = max(1, R // rows)
    assert sum(counts) == buckets.count(rows) and len(counts) == -(-sum(counts) // per_call)
    assert max(counts) * rows <= R or per_call == 1
  assert sorted({r for r, _ in calls}) == sorted(set(buckets)) and buckets.count(1) == 2
  assert [len(tokens) for r, tokens in calls if r == 1] == [2]  # the two one-row clients share a call
  whole = rounds.validation_losses(variant(base_run, clients_per_chunk=0), adapters, valid)
  assert calls[-1][0] == R  # all clients at once: the padded batches
  np.testing.assert_allclose(chunked, whole, rtol=1e-5)
  some = np.asarray([3, 0, 2])
  np.testing.assert_allclose(rounds.validation_losses(run, adapters, valid, some), whole[some], rtol=1e-5)
  assert np.isfinite(chunked).all() and len(set(np.round(chunked, 4))) > 1
  # Packed from the plan (the real batches, nothing held) against all of them at once.
  at_once = rounds.validation_data(variant(base_run, clients_per_chunk=0))
  assert at_once.held is not None
  whole = rounds.validation_losses(variant(base_run, clients_per_chunk=0), adapters, at_once)
  np.testing.assert_allclose(rounds.validation_losses(run, adapters, rounds.validation_data(run)), whole, rtol=1e-5)


def test_best_adapters_are_updated_in_place():
  """Improved clients take their new adapters, the others keep their best; the previous best adapters are
  donated to the update, not copied (as large as every client's adapters: 273 MiB at 10,000 clients)."""
  best, new = {"a": jnp.zeros((4, 3, 2))}, {"a": jnp.ones((4, 3, 2))}
  kept = rounds._keep_best(jnp.asarray([True, False, True, False]), new, best)
  np.testing.assert_array_equal(np.asarray(kept["a"])[:, 0, 0], [1, 0, 1, 0])
  assert best["a"].is_deleted() and not new["a"].is_deleted()


@pytest.mark.parametrize("per_round,lanes", [(3, 0), (3, 1), (0, 0), (0, 3)],
                         ids=["3_at_once", "3_by_lanes", "all_at_once", "all_by_lanes"])
def test_every_round_of_a_run_runs_one_program(tmp_path, monkeypatch, per_round, lanes):
  """rounds.plan_round_shapes covers every round's participants: all rounds hand the compiled round the
  same stream budgets and batch (or lane wave) shapes, so it compiles once, where the rounds' own budgets
  differ (without the plan, several programs)."""
  config = default.get_config("smoke")
  config.fed.num_clients, config.fed.clients_per_round, config.fed.rounds = 8, per_round, 8
  config.fed.clients_per_chunk, config.fed.stream_sizes = lanes, 2
  config.pretrain.steps, config.model.num_layers = 2, 2
  run = rounds.plan_round_shapes(setup_lib.setup(config, tmp_path))
  assert len(run.round_shapes.sizes) > 1  # the steps differ: several sizes, one program
  given, own = [], []
  real_sizes = training.step_sizes

  def step_sizes(needs, sizes):
    own.append(real_sizes(needs, None)[1])  # the round's own budgets
    return real_sizes(needs, sizes)

  def compiled_round(base, states, batches, *args, lc, sizes, **kwargs):  # stands in for the jitted round
    given.append((sizes, batches.tokens.shape))
    m = states.rng.shape[0]
    return states, training.ClientMetrics(jnp.full(m, 2.0), jnp.ones(m, jnp.int32), jnp.ones(m))

  monkeypatch.setattr(training, "step_sizes", step_sizes)
  monkeypatch.setattr(training, "_streamed_round_jit", compiled_round)
  monkeypatch.setattr(training, "_lanes_round_jit", compiled_round)
  clients = state_lib.init_state(run).clients
  for r in range(config.fed.rounds):
    part = participation.sample_participants(config.seed, r, np.ones(8, bool), per_round)
    batches = rounds.client_data(run, lambda slots: batching.round_batches(run.train_plan, r, part[slots]),
                                 len(part))
    ctx = training.RoundContext(jnp.int32(0), jnp.ones(len(part), jnp.float32))
    rounds.train_clients(run, participation.gather(clients, jnp.asarray(part)), batches, None, ctx)
  assert len(given) == config.fed.rounds and len(set(given)) == 1, given
  assert given[0][0] == run.round_shapes.sizes
  assert (run.round_shapes.waves > 0) == (per_round > 0 and lanes > 0)  # all clients: the same waves anyway
  if per_round or lanes:  # the rounds' own budgets differ: without the plan, more than one compilation
    assert len(set(own)) > 1


# ----------------------------------------------------------------------------------------------------
# The aggregation restricted to the clients that count


def test_excluded_client_neither_gives_nor_takes_and_the_rest_mix_as_without_it():
  """FELLRec's and FedAvg's mixing with client 2 excluded equals the mixing of the other clients alone
  (an independent computation on the [C-1] subset); client 2 keeps its adapters bit for bit."""
  C, keep = 5, np.asarray([0, 1, 3, 4])
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  adapters = {"a": jax.random.normal(k1, (C, 2, 3, 4)), "b": jax.random.normal(k2, (C, 2, 4))}
  losses = jnp.asarray([0.9, 1.4, 7.0, 1.1, 0.8])
  examples = jnp.asarray([10.0, 20.0, 5.0, 7.0, 3.0])
  include = jnp.asarray(np.isin(np.arange(C), keep))
  for name in ("fellrec", "fedavg"):
    spec = aggregation.AggregatorSpec(name=name, server_layers=(False, False))
    heat = heating.HeatState(jnp.int32(1), jnp.full(C, 0.5))
    mixed, matrix, new_heat, _ = aggregation.aggregate(adapters, losses, heat, jnp.int32(1), examples, include,
                                                       spec=spec)
    sub = rows(adapters, keep)
    sub_heat = heating.HeatState(jnp.int32(1), jnp.full(len(keep), 0.5))
    alone, alone_matrix, alone_heat, _ = aggregation.aggregate(sub, losses[keep], sub_heat, jnp.int32(1),
                                                               examples[keep], spec=spec)
    for x, y in zip(jax.tree.leaves(rows(mixed, keep)), jax.tree.leaves(alone)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)  # float32 sums in another order
    np.testing.assert_allclose(np.asarray(matrix)[np.ix_(keep, keep)], alone_matrix, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(matrix)[2], np.eye(C)[2])
    np.testing.assert_array_equal(np.asarray(matrix)[keep, 2], 0.0)
    assert_same(rows(mixed, 2), rows(adapters, 2))
    assert float(new_heat.warm_weight[2]) == 0.5
    np.testing.assert_allclose(np.asarray(new_heat.warm_weight)[keep], alone_heat.warm_weight, rtol=1e-6)


def test_an_excluded_clients_nan_adapters_reach_nobody():
  C = 3
  adapters = {"a": jnp.ones((C, 1, 4)).at[1].set(jnp.nan)}
  include = jnp.asarray([True, False, True])
  safe = aggregation.keep_excluded(adapters, {"a": jnp.zeros((C, 1, 4))}, include)
  spec = aggregation.AggregatorSpec(name="fellrec", server_layers=(False,))
  mixed, matrix, _, _ = aggregation.aggregate(safe, jnp.asarray([1.0, jnp.nan, 1.0]),
                                              heating.HeatState(jnp.int32(0), jnp.ones(C)), jnp.int32(0),
                                              jnp.ones(C), include, spec=spec)
  assert np.isfinite(np.asarray(mixed["a"])).all() and np.isfinite(np.asarray(matrix)).all()


# ----------------------------------------------------------------------------------------------------
# Rounds


def test_partial_participation_trains_exactly_the_sampled_clients_reproducibly(base_run, quick):
  run = base_run
  chosen = sampled(run, 0)
  before, state, record = one_round(run)
  given = quick.batches  # the sampled clients' own batches, in their order
  expected = batching.round_batches(run.train_plan, 0, chosen)
  np.testing.assert_array_equal(np.asarray(given.tokens), expected.tokens)
  np.testing.assert_array_equal(np.asarray(given.step_mask), expected.step_mask)
  after = host(state.clients.adapters)
  absent = np.setdiff1d(np.arange(NUM_CLIENTS), chosen)
  assert_same(rows(after, absent), rows(before, absent))  # bit for bit
  for c in chosen:
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(rows(after, c)),
                                                           jax.tree.leaves(rows(before, c))))
  assert record["participants"] == chosen.tolist()
  assert np.asarray(record["aggregation"]).shape == (PER_ROUND, PER_ROUND)
  assert [c["status"] for c in record["clients"]] == ["trained" if c in chosen else "absent"
                                                      for c in range(NUM_CLIENTS)]
  assert all((c["train_loss"] is None) == (c["client"] not in chosen) for c in record["clients"])
  _, again, record_again = one_round(run)
  assert_same(host(again.clients.adapters), after)  # the same seed: the same clients, the same numbers
  record.pop("seconds"), record_again.pop("seconds")
  assert record == record_again


def test_dropped_clients_are_those_the_seed_says(base_run, quick):
  seed, chosen = base_run.config.seed, sampled(base_run, 0)
  draws = {p: participation.sample_dropped(seed, 0, chosen, NUM_CLIENTS, p) for p in np.linspace(0.05, 0.95, 19)}
  prob = next(p for p, d in draws.items() if d.sum() == 1)  # one of the two fails in round 0
  expected = chosen[draws[prob]]
  before, state, record = one_round(variant(base_run, dropout_prob=float(prob)))
  assert record["dropped"] == expected.tolist() and record["participants"] == chosen.tolist()
  assert [c["status"] for c in record["clients"]].count("dropped") == 1
  assert record["clients"][int(expected[0])]["status"] == "dropped"
  assert_same(rows(host(state.clients.adapters), expected), rows(before, expected))
  np.testing.assert_array_equal(record["aggregation"], np.eye(PER_ROUND))  # the other has no one to mix with


def test_a_nan_client_is_quarantined_as_if_it_had_sat_out(base_run, quick, monkeypatch):
  run = base_run
  bad = int(sampled(run, 0)[1])
  _, sat_out, sat_record = _with_failure(run, monkeypatch, bad)
  before, state, record = _with_nan(run, monkeypatch, bad)
  assert record["non_finite"] == [bad] and record["clients"][bad]["status"] == "non_finite"
  assert record["clients"][bad]["train_loss"] is None and sat_record["dropped"] == [bad]
  after, reference = host(state.clients.adapters), host(sat_out.clients.adapters)
  assert_same(after, reference)  # the others bit for bit as when it sat out; it keeps its adapters
  assert_same(rows(after, bad), rows(before, bad))
  assert int(state.server.bad_rounds[bad]) == 1 and not bool(state.server.retired[bad])
  assert np.isfinite(record["val_loss_weighted"])


def _with_failure(run, monkeypatch, client):
  with monkeypatch.context() as m:
    m.setattr(participation, "sample_dropped", lambda seed, r, part, n, prob: part == client)
    return one_round(run)


def _with_nan(run, monkeypatch, client):
  with monkeypatch.context() as m:
    poison(m, client)
    return one_round(run)


def test_max_bad_rounds_retires_a_failing_client_then_stops_the_run(base_run, quick, monkeypatch, caplog):
  run = variant(base_run, max_bad_rounds=2)
  bad = int(sampled(run, 0)[0])
  poison(monkeypatch, bad)
  state = state_lib.init_state(run)
  valid = valid_batches(run)
  for _ in range(2):  # round 0's participants twice: two consecutive non-finite rounds of client `bad`
    state, record = rounds.run_round(run, state, 0, valid)
  assert np.flatnonzero(np.asarray(state.server.retired)).tolist() == [bad]
  assert record["clients"][bad]["status"] == "non_finite" and int(state.server.bad_rounds[bad]) == 2
  assert "retired after 2 consecutive non-finite rounds" in caplog.text
  for r in range(5):  # it is never sampled again
    assert bad not in rounds.round_roster(run, state, r).participants
  state = state._replace(server=state.server._replace(retired=jnp.ones(NUM_CLIENTS, bool)))
  with pytest.raises(rounds.ClientsFailed, match="fed.max_bad_rounds=2"):
    rounds.run_round(run, state, 1, valid)


def test_many_clients_are_summarised_in_metrics_and_kept_in_an_array_file(base_run, quick, tmp_path):
  run = dataclasses.replace(variant(base_run, log_metrics_clients=1), workdir=tmp_path)
  _, _, record = one_round(run)
  arrays = record[round_records.ARRAYS]

  class Progress:
    def set_postfix(self, **kwargs):
      pass

  train.log_round(run, record, Progress())
  line = json.loads((tmp_path / "metrics.jsonl").read_text())
  assert "clients" not in line and "aggregation" not in line and round_records.ARRAYS not in line
  summary = line["clients_summary"]
  assert summary["count"] == NUM_CLIENTS and summary["status"] == {"trained": PER_ROUND, "absent": 2}
  trained = arrays["train_loss"][np.isfinite(arrays["train_loss"])]
  assert summary["train_loss"]["mean"] == pytest.approx(trained.mean())
  assert line["aggregation_summary"]["size"] == PER_ROUND and line["participants"] == {"count": PER_ROUND}
  saved = np.load(tmp_path / "rounds/round_00000.npz")
  np.testing.assert_array_equal(saved["aggregation"], arrays["aggregation"])
  np.testing.assert_array_equal(saved["status"], arrays["status"])
  assert saved["aggregation"].shape == (PER_ROUND, PER_ROUND)


def test_resumed_partial_participation_ends_where_the_uninterrupted_run_ends(base_run, quick, tmp_path):
  """The checkpoint holds every part of the state a round reads (the server's fault counters and latest
  validation losses included): restored, it is bit for bit the state saved, and the next round from either
  gives the same record and state (round 0's clients again)."""
  run = dataclasses.replace(variant(base_run, dropout_prob=0.3), workdir=tmp_path)
  valid = valid_batches(run)
  state, _ = rounds.run_round(run, state_lib.init_state(run), 0, valid)
  state = state._replace(server=state.server._replace(bad_rounds=state.server.bad_rounds.at[3].set(1)))
  mngr = checkpoint.manager(tmp_path / "checkpoints")
  fingerprint = checkpoint.config_fingerprint(setup_lib.config_dict(run.config), state_lib.RESUMABLE_FIELDS)
  checkpoint.save(mngr, 1, state_lib.checkpointable(state), {"config": fingerprint, "rounds_done": 1})
  resumed = state_lib.resume_or_init(run, mngr)
  assert_same(host(state_lib.checkpointable(state)), host(state_lib.checkpointable(resumed)))
  assert int(resumed.server.bad_rounds[3]) == 1 and np.isfinite(np.asarray(resumed.server.last_val)).any()
  state, record = rounds.run_round(run, state, 0, valid)
  resumed, resumed_record = rounds.run_round(run, resumed, 0, valid)
  record.pop("seconds"), resumed_record.pop("seconds")
  assert record == resumed_record
  assert_same(host(state_lib.checkpointable(state)), host(state_lib.checkpointable(resumed)))


def test_plots_summarise_many_clients(tmp_path):
  from fellrec_jax.evaluation import plots
  listed = [{"round": r, "clients": [{"client": c, "train_loss": float(c + r)} for c in range(20)]} for r in range(3)]
  summarised = [{"round": 3, "clients_summary": {"train_loss": {"min": 1.0, "mean": 2.0, "max": 3.0}}}]
  lines = plots._series(listed + summarised, "client", "train_loss")
  assert [label for label, *_ in lines] == ["min over clients", "mean over clients", "max over clients"]
  assert lines[0][1:] == ((0, 1, 2, 3), (0.0, 1.0, 2.0, 1.0)) and lines[2][2] == (19.0, 20.0, 21.0, 3.0)
  assert plots.plot_round_curves(summarised, tmp_path / "curves.png").stat().st_size > 0
  assert plots.plot_mixing_strip(summarised, tmp_path / "mixing.png").stat().st_size > 0
  report = {"clients": [{"client": c, "recall@10": c / 40} for c in range(40)], "overall": {"recall@10": 0.5}}
  assert plots.plot_client_bars({"fellrec": report}, tmp_path / "bars.png", metrics=["recall@10"]).exists()
