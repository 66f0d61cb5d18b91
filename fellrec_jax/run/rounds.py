"""One round of a run: local training of every client, the server's aggregation, validation, each
client's best adapters, early stopping, and the round's metrics record (docs/method.md §4)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from fellrec_jax.data import batching
from fellrec_jax.federated import aggregation
from fellrec_jax.federated import heating
from fellrec_jax.federated import participation
from fellrec_jax.federated import sharding
from fellrec_jax.federated import stream
from fellrec_jax.federated import training
from fellrec_jax.model import split as split_lib
from fellrec_jax.run import distributed
from fellrec_jax.run import round_records
from fellrec_jax.run.setup import Run
from fellrec_jax.run.state import ServerState, TrainState

logger = logging.getLogger("fellrec_jax")


def aggregator_spec(run: Run) -> aggregation.AggregatorSpec:
  f, fed = run.config.fellrec, run.config.fed
  return aggregation.AggregatorSpec(
      name=run.aggregator, alpha=f.alpha, beta=f.beta, temperature=f.temperature,
      skip_warm_when_beta_is_1=f.skip_warm_when_beta_is_1, sequential_update=f.sequential_update,
      server_layers=tuple(bool(x) for x in split_lib.server_layer_mask(run.model_cfg, fed.split_k)),
      shared_server_adapters=fed.server_adapters == "shared")


def aggregate(run: Run, adapters, train_loss, heat: heating.HeatState, round_index: int, clients=None,
              include=None):
  """(mixed adapters, mixing matrix [m, m] for the log, new heat state, the adapters' similarity [m, m]) for
  the configured aggregator, over the round's participants `clients` (None: all); `include` [m] bool: the
  participants whose round counts (None: all of them)."""
  num_examples = run.train_plan.num_examples if clients is None else run.train_plan.num_examples[clients]
  return aggregation.aggregate(adapters, train_loss, heat, jnp.int32(round_index),
                               jnp.asarray(num_examples, jnp.float32), include, spec=aggregator_spec(run))


# ----------------------------------------------------------------------------------------------------
# One round


class ClientsFailed(RuntimeError):
  """Every client has been retired by fed.max_bad_rounds: the run cannot go on."""


def round_context(run: Run, state: TrainState, round_index: int, clients: np.ndarray) -> training.RoundContext:
  """The round's warm-up and the participants' ([m]) learning-rate scales."""
  warmup = run.config.train.warmup_steps if round_index == 0 else 0
  scale = jnp.ones(len(clients), jnp.float32)
  if run.aggregator == "fellrec" and run.config.fellrec.heat_apply_to == "aggregation_and_local_lr":
    scale = state.server.heat.warm_weight[clients]  # the warm weights of their last aggregation (1 before)
  return training.RoundContext(jnp.int32(warmup), scale)


def train_clients(run: Run, clients, batches, anchors, ctx):
  """One local round; without anchors there is no proximal term (ditto's global models)."""
  lc = run.lc if anchors is not None else dataclasses.replace(run.lc, prox_mu=0.0)
  shapes = run.round_shapes
  return training.local_round(run.base, clients, batches, run.data.prefix_ids, run.data.prefix_loss_mask,
                               anchors, ctx, lc=lc, lanes=run.lanes, schedule=lane_schedule(run, batches),
                               sizes=shapes.sizes if shapes is not None else None)


class RoundShapes(NamedTuple):
  """What every round of a run is padded to (`plan_round_shapes`)."""

  waves: int  # lane waves of the round's schedule (0: the rounds do not run by lanes, or not padded)
  sizes: training.Sizes  # the budgets the streams' steps run at (each step the smallest that holds it)


def plan_round_shapes(run: Run) -> Run:
  """`run` with the shapes of all its rounds, taken from each round's participants (seeded, no client
  retired) and their batches, host-side, once: with partial participation and lanes, the most lane waves
  of any round; and the streams' sizes, at most `fed.stream_sizes` budgets chosen over the steps of all
  rounds (`stream.plan_sizes`) so that each step runs at the smallest that holds it. Every round then runs
  one compiled program, where each round's own budgets would make a new one, and a step of few tokens
  does not pay for the round's largest. A round that needs more (a retired client changed who takes
  part) raises the largest size for itself (one more compilation). In a multi-process run each process
  measures the clients it holds, and the most over all processes is taken (`training.stream_needs`)."""
  per_round = run.config.fed.get("clients_per_round", 0)
  start, eligible = time.perf_counter(), np.ones(run.num_train_clients, bool)
  mesh = run.mesh if run.mesh.shape.get("clients", 1) > 1 and run.mesh.shape.get("model", 1) == 1 else None
  waves, needs = 0, []
  for r in range(run.config.fed.rounds):
    part = participation.sample_participants(run.config.seed, r, eligible, per_round)
    if jax.process_count() > 1:  # this process's clients, as the round places them
      batches = participant_batches(run, r, part)
    else:
      batches = training.batches_from(batching.round_batches(run.train_plan, r, part))
    if 0 < run.lanes < len(part):  # by lanes: the schedule local_round makes (idle waves add no tokens)
      schedule = training.lane_schedule(np.asarray(batches.step_mask).sum(axis=1), run.lanes)
      if 0 < per_round < run.num_train_clients:  # lane_schedule pads partial participation's to `waves`
        waves = max(waves, schedule.client.shape[0])
      needs.append(training.round_needs(training.arrange(batches, schedule), run.lc, waves=True))
    else:
      needs.append(training.round_needs(batches, run.lc, mesh=mesh))
  if waves:  # the idle waves each round is padded with
    needs = [np.concatenate([n, np.zeros((waves - len(n), *n.shape[1:]), n.dtype)]) for n in needs]
  sizes = stream.plan_sizes(np.concatenate(needs), run.config.fed.get("stream_sizes", 1))
  logger.info("streamed steps run at %d size(s) %s%s (planned in %.1f s)", len(sizes),
              [[tuple(b) for b in size] for size in sizes], f", every round padded to {waves} lane waves" if waves
              else "", time.perf_counter() - start)
  return dataclasses.replace(run, round_shapes=RoundShapes(waves, sizes))


def lane_schedule(run: Run, batches) -> training.LaneSchedule | None:
  """With partial participation and lanes, the participants' lane schedule padded with idle waves to the
  run's planned waves (`plan_round_shapes`), or else to a bucket (`wave_bucket`: rounds share a few shapes
  and compilations while the padding costs at most about 1/16 of the waves); else None."""
  m = batches.step_mask.shape[0]
  per_round = run.config.fed.get("clients_per_round", 0)
  if not 0 < per_round < run.num_train_clients or not 0 < run.lanes < m:
    return None
  schedule = training.lane_schedule(np.asarray(batches.step_mask).sum(axis=1), run.lanes)
  waves = schedule.client.shape[0]
  if run.round_shapes is not None and run.round_shapes.waves:
    waves = max(waves, run.round_shapes.waves)
  else:
    waves = wave_bucket(waves, max_waves(run.train_plan.client_steps, m, run.lanes))
  pad = lambda x: np.concatenate([x, np.zeros((waves - x.shape[0], x.shape[1]), x.dtype)])
  return training.LaneSchedule(*(pad(x) for x in schedule))


def wave_bucket(waves: int, bound: int) -> int:
  """`waves` rounded up to a multiple of 8, or to 1/16 of its power of two when larger (stream.round_up),
  never beyond `bound`, the most any round can need."""
  return min(bound, max(stream.round_up(waves), -(-waves // 8) * 8))


def max_waves(client_steps, m: int, lanes: int) -> int:
  """An upper bound on the waves of any m clients' lane schedule (list scheduling: the busiest lane's last
  client starts by (total - its steps) / lanes, so the busiest lane ends by (T - p) // lanes + p <= that
  with p the most steps of a client and T the sum of the m largest)."""
  steps = np.sort(np.asarray(client_steps, np.int64))[::-1][:m]
  return max(1, int((steps.sum() - steps[0]) // lanes + steps[0]))


def eval_adapters(run: Run, adapters):
  """[C, ...] adapters to validate/evaluate: centralized broadcasts its one model to every client."""
  if run.num_train_clients == run.num_clients:
    return adapters
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (run.num_clients, *x.shape[1:])), adapters)


class Validation(NamedTuple):
  """A run's validation data (`validation_data`): the validation plan, `rows` [C], the rows each client's
  steps use, and `held`, every client's padded batches on the mesh, kept only where validation runs all
  clients at once (`validates_at_once`); otherwise each call packs its few clients' batches from the plan,
  so that nothing grows with the number of clients but the plan itself."""

  plan: batching.BatchPlan
  rows: np.ndarray
  held: training.ClientBatches | None = None


def validates_at_once(run: Run) -> bool:
  """Whether a validation of every client is one call: without clients_per_chunk (0 or >= C), or in a
  multi-process run (each process its own clients)."""
  chunk = run.config.fed.clients_per_chunk
  return not 0 < chunk < run.num_clients or jax.process_count() > 1


def validation_data(run: Run) -> Validation:
  plan = run.data.valid_plan
  held = client_data(run, run.data.valid_batches, run.num_clients) if validates_at_once(run) else None
  return Validation(plan, batching.client_rows(plan), held)


def validation_batches(valid: Validation, index: np.ndarray, rows: int) -> training.ClientBatches:
  """The batches of clients `index` (repeats allowed), cut to their first `rows` rows."""
  if valid.held is not None:
    return jax.tree.map(lambda x: x[index] if x.ndim < 3 else x[index, :, :rows], valid.held)
  packed = training.batches_from(batching.eval_batches(valid.plan, index))
  return jax.tree.map(lambda x: x if x.ndim < 3 else x[:, :, :rows], packed)


def validation_losses(run: Run, adapters, valid: Validation, clients: np.ndarray | None = None) -> np.ndarray:
  """[n] token-mean validation NLL of the adapters of `clients` (None: all C; nan for a client without
  validation data).

  So that memory stays bounded with thousands of clients, clients are validated a few at a time, each
  call holding at most the rows of `clients_per_chunk` (else fed.clients_per_round) clients' padded
  batches: every client's batches are padded to the largest client's rows, while most clients use few
  (`Validation.rows`). Clients are grouped by the rows they use, rounded up to a power of two, and each
  call keeps only those rows, so it validates as many clients of the group as the row limit allows (the
  last call of a group padded with masked copies); calls share a few shapes. In a multi-process run all
  at once, each process its own.
  """
  adapters = eval_adapters(run, adapters)
  C = run.num_clients
  if clients is None and validates_at_once(run):
    total, count = training.validation_nll(run.base, adapters, valid.held, run.data.prefix_ids,
                                           run.data.prefix_loss_mask, lc=run.lc)
    total, count = (np.asarray(x, np.float64) for x in sharding.to_host((total, count)))
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)
  clients = np.arange(C) if clients is None else np.asarray(clients)
  # The rows of `chunk` clients' padded batches per call: clients_per_chunk, else the participants of a round.
  chunk = run.config.fed.clients_per_chunk
  chunk = chunk if 0 < chunk < C else min(C, run.config.fed.get("clients_per_round", 0) or C)
  limit = valid.plan.rows_per_step
  bucket = np.asarray([row_bucket(int(r), limit) for r in valid.rows[clients]])
  total, count = np.zeros(len(clients)), np.zeros(len(clients))
  for rows, slots, per_call in tqdm(validation_calls(bucket, chunk * limit), desc=f"validating {len(clients)} clients",
                                    unit="call", leave=False, disable=len(clients) < batching.PROGRESS_MIN_CLIENTS):
    real = np.arange(per_call) < len(slots)
    index = clients[slots[np.minimum(np.arange(per_call), len(slots) - 1)]]
    part = validation_batches(valid, index, rows)
    part = part._replace(step_mask=part.step_mask & real[:, None])
    t, c = training.validation_nll(run.base, jax.tree.map(lambda x: x[index], adapters), part,
                                   run.data.prefix_ids, run.data.prefix_loss_mask, lc=run.lc)
    total[slots], count[slots] = np.asarray(t, np.float64)[real], np.asarray(c, np.float64)[real]
  return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def validation_calls(bucket: np.ndarray, row_limit: int) -> list[tuple[int, np.ndarray, int]]:
  """(rows kept, positions in `bucket` validated, clients per call) of each validation call: the clients
  of each row group (`bucket` [n]: each one's rows, rounded up) in calls of as many as `row_limit` rows hold."""
  calls = []
  for rows in np.unique(bucket):
    group, per_call = np.flatnonzero(bucket == rows), max(1, row_limit // int(rows))
    calls += [(int(rows), group[start:start + per_call], per_call) for start in range(0, len(group), per_call)]
  return calls


def row_bucket(rows: int, limit: int) -> int:
  """`rows` rounded up to a power of two, at most `limit` (and at least 1)."""
  return min(limit, 1 << max(rows - 1, 0).bit_length())


def round_roster(run: Run, state: TrainState, round_index: int) -> participation.Roster:
  """The round's participants: fed.clients_per_round of the clients not retired, and their failures."""
  fed = run.config.fed
  check_clients_left(state, run.config)
  eligible = ~np.asarray(state.server.retired)
  return participation.roster(run.config.seed, round_index, eligible, fed.get("clients_per_round", 0),
                              fed.get("dropout_prob", 0.0))


def participants_state(states, roster: participation.Roster):
  """(the participants' client states to train, which the round consumes; a copy of them before it)."""
  if states is None:
    return None, None
  if roster.everyone:
    return states, jax.tree.map(jnp.copy, states)
  index = jnp.asarray(roster.participants)
  return participation.gather(states, index), participation.gather(states, index)


def settle(trained: training.ClientStates, before: training.ClientStates, adapters, include: np.ndarray):
  """The participants' states after the round: the new adapters (and optimizer state) where included, the
  ones before it, bit for bit, where not; the PRNG keys move on either way."""
  mask = jnp.asarray(include)
  keep = lambda new, old: None if new is None else aggregation.keep_excluded(new, old, mask)
  return training.ClientStates(keep(adapters, before.adapters), keep(trained.opt_state, before.opt_state),
                               trained.rng)


def put_back(states, roster: participation.Roster, rows):
  """The participants' rows written back into every client's state."""
  if states is None or roster.everyone:
    return rows
  return _scatter_jit(states, jnp.asarray(roster.participants), rows)


_scatter_jit = jax.jit(participation.scatter, donate_argnums=(0,))


def local_and_aggregate(run: Run, state: TrainState, round_index: int, roster, batches, ctx):
  """The participants' local training and the server's aggregation: (clients, global clients, metrics,
  participation.Outcome, mixing matrix, heat state, similarity)."""
  part, server = roster.participants, state.server
  sub, before = participants_state(state.clients, roster)
  similarity = None
  heat = server.heat if roster.everyone else heating.HeatState(server.heat.round, server.heat.warm_weight[part])
  if run.aggregator == "ditto":
    gsub, gbefore = participants_state(state.global_clients, roster)
    gtrained, gmetrics = train_clients(run, gsub, batches, None, ctx)
    trained, metrics = train_clients(run, sub, batches, gbefore.adapters, ctx)  # w^t anchors the personal models
    outcome = participation.outcome(roster, participation.finite_clients(trained.adapters, metrics.train_loss)
                            & participation.finite_clients(gtrained.adapters, gmetrics.train_loss))
    include = jnp.asarray(outcome.include)
    matrix = aggregation.fedavg_matrix(run.train_plan.num_examples[part], include)
    safe = aggregation.keep_excluded(gtrained.adapters, gbefore.adapters, include)
    glob = settle(gtrained, gbefore, aggregation.mix(safe, matrix), outcome.include)
    global_clients = put_back(state.global_clients, roster, glob)
    adapters = trained.adapters
  else:
    anchors = before.adapters if run.aggregator == "fedprox" else None
    trained, metrics = train_clients(run, sub, batches, anchors, ctx)
    outcome = participation.outcome(roster, participation.finite_clients(trained.adapters, metrics.train_loss))
    include = jnp.asarray(outcome.include)  # always an array: one compilation, whoever is left out
    safe = aggregation.keep_excluded(trained.adapters, before.adapters, include)
    adapters, matrix, heat, similarity = aggregate(run, safe, metrics.train_loss, heat, round_index, part, include)
    global_clients = state.global_clients
  clients = put_back(state.clients, roster, settle(trained, before, adapters, outcome.include))
  if not roster.everyone:
    heat = heating.HeatState(heat.round, server.heat.warm_weight.at[jnp.asarray(part)].set(heat.warm_weight))
  return clients, global_clients, metrics, outcome, matrix, heat, similarity


def run_round(run: Run, state: TrainState, round_index: int, valid: Validation) -> tuple[TrainState, dict]:
  start = time.perf_counter()
  roster = round_roster(run, state, round_index)
  part = roster.participants
  batches = participant_batches(run, round_index, part)
  ctx = round_context(run, state, round_index, part)
  clients, global_clients, metrics, outcome, matrix, heat, similarity = local_and_aggregate(
      run, state, round_index, roster, batches, ctx)
  metrics, matrix, similarity = sharding.to_host((metrics, matrix, similarity))  # every process's clients
  changed = changed_clients(run, outcome)
  val = updated_validation(run, state, clients.adapters, valid, changed)
  weighted = weighted_val_loss(run, val)
  server = faults(run, state.server, outcome, round_index)
  state, improved = update_best(run, TrainState(clients, global_clients, state.best_adapters, server), val,
                                weighted, round_index, heat, changed)
  record = round_records.round_record(
      run, round_index, metrics, val, weighted, improved, matrix, state.server, ctx.lr_scale, batches,
      clients.adapters, time.perf_counter() - start, outcome, similarity if run.aggregator == "fellrec" else None)
  return state, record


def changed_clients(run: Run, outcome: participation.Outcome) -> np.ndarray:
  """[C] bool: the clients whose adapters the round changed (centralized: its one model is every client's)."""
  if run.num_train_clients != run.num_clients:
    return np.full(run.num_clients, bool(outcome.include.any()))
  changed = np.zeros(run.num_clients, bool)
  changed[outcome.roster.participants[outcome.include]] = True
  return changed


def updated_validation(run: Run, state: TrainState, adapters, valid: Validation, changed: np.ndarray) -> np.ndarray:
  """[C] validation losses after the round: recomputed for the clients whose adapters changed (and those
  never validated), the latest ones for the others (their adapters are bit for bit the same)."""
  val = np.asarray(state.server.last_val, np.float64).copy()
  stale = np.isinf(val) | changed
  if stale.all() or jax.process_count() > 1:  # a multi-process run validates every process's clients
    return validation_losses(run, adapters, valid)
  if stale.any():
    val[stale] = validation_losses(run, adapters, valid, np.flatnonzero(stale))
  return val


def faults(run: Run, server: ServerState, outcome: participation.Outcome, round_index: int) -> ServerState:
  """Count each participant's consecutive non-finite rounds (a client that failed to report is not
  counted: the server never saw its round), log the round's faults, and retire a client after
  fed.max_bad_rounds of them."""
  part, roster = outcome.roster.participants, outcome.roster
  bad = ~outcome.finite & ~roster.dropped
  counts = np.asarray(server.bad_rounds).copy()
  counts[part] = np.where(bad, counts[part] + 1, 0)
  limit = run.config.fed.get("max_bad_rounds", 0)
  retired = np.asarray(server.retired).copy()
  newly = np.zeros_like(retired)
  if limit > 0:
    newly = (counts >= limit) & ~retired
    retired |= newly
  if roster.dropped.any():
    logger.warning("round %d: %d of %d participants failed to report (fed.dropout_prob): clients %s",
                   round_index, int(roster.dropped.sum()), len(part), id_list(part[roster.dropped]))
  if bad.any():
    logger.warning("round %d: non-finite loss or adapters, left out of the aggregation with their last good "
                   "adapters: clients %s", round_index, id_list(part[bad]))
  if newly.any():
    logger.warning("round %d: clients %s retired after %d consecutive non-finite rounds (fed.max_bad_rounds)",
                   round_index, id_list(np.flatnonzero(newly)), limit)
  return server._replace(bad_rounds=jnp.asarray(counts, jnp.int32), retired=jnp.asarray(retired))


def id_list(ids, shown: int = 20) -> str:
  """Client ids for a log line: all of them up to `shown`, else the first ones and the count."""
  ids = [int(i) for i in ids]
  return str(ids) if len(ids) <= shown else f"{ids[:shown]} and {len(ids) - shown} more"


def check_clients_left(state: TrainState, config) -> None:
  """Stop the run with a clear message once fed.max_bad_rounds has retired every client."""
  if bool(np.all(np.asarray(state.server.retired))):
    raise ClientsFailed(f"every client was retired after fed.max_bad_rounds={config.fed.max_bad_rounds} "
                        "consecutive rounds of non-finite training: lower train.learning_rate, or raise "
                        "fed.max_bad_rounds")


def client_data(run: Run, build, num_clients: int | None = None) -> training.ClientBatches:
  """`build(clients)`'s batches of this process's clients, as global arrays sharded over `clients`."""
  num_clients = run.num_train_clients if num_clients is None else num_clients
  local = distributed.local_clients(run.mesh, num_clients)
  return sharding.put_local_clients(training.batches_from(build(local)), run.mesh, num_clients)


def participant_batches(run: Run, round_index: int, part: np.ndarray) -> training.ClientBatches:
  """The round's batches of participants `part` (`client_data`)."""
  return client_data(run, lambda slots: batching.round_batches(run.train_plan, round_index, part[slots]), len(part))


def weighted_val_loss(run: Run, val: np.ndarray) -> float:
  """Clients' validation losses weighted by their validation examples (the reference's early-stop signal)."""
  n_val = run.data.num_valid_examples.astype(np.float64)
  has_val = ~np.isnan(val)
  return float(np.sum(np.where(has_val, val, 0) * n_val) / max(n_val[has_val].sum(), 1))


@functools.partial(jax.jit, donate_argnums=(2,))
def _keep_best(improved, adapters, best):
  """`adapters` where `improved` [C], else `best`, written over `best` (donated: the previous best adapters,
  as large as the clients' adapters, are not copied each round)."""
  return aggregation.keep_excluded(adapters, best, improved)


def update_best(run: Run, state: TrainState, val: np.ndarray, weighted: float, round_index: int, heat,
                changed: np.ndarray):
  """Keep each client's best adapters (by its own validation loss) and track early stopping; `changed` [C]:
  the clients whose adapters this round changed."""
  server = state.server
  best_val = np.asarray(server.best_val)
  has_val = ~np.isnan(val)
  improved = np.where(has_val, val < best_val, changed)  # a client without validation data keeps its latest
  best_adapters = _keep_best(jnp.asarray(improved), eval_adapters(run, state.clients.adapters), state.best_adapters)
  better = weighted < float(server.best_weighted)
  stale = 0 if better else int(server.stale_rounds) + 1
  stopped = stale >= run.config.fed.patience and round_index > run.config.fed.min_rounds
  server = server._replace(
      rounds_done=jnp.int32(round_index + 1), heat=heat,
      best_val=jnp.asarray(np.where(improved & has_val, val, best_val), jnp.float32),
      best_round=jnp.asarray(np.where(improved, round_index, np.asarray(server.best_round)), jnp.int32),
      best_weighted=jnp.float32(min(weighted, float(server.best_weighted))), stale_rounds=jnp.int32(stale),
      stopped=jnp.bool_(stopped), last_val=jnp.asarray(val, jnp.float32))
  server = sharding.replicate(server, run.mesh)  # a global value on every device (as Orbax saves it)
  return state._replace(best_adapters=best_adapters, server=server), improved
