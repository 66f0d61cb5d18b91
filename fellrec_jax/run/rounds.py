"""One round of a run: local training of every client, the server's aggregation, validation, each
client's best adapters, early stopping, and the round's metrics record (docs/method.md §4)."""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from fellrec_jax.data import batching
from fellrec_jax.federated import aggregation
from fellrec_jax.federated import heating
from fellrec_jax.federated import optimizer as optimizer_lib
from fellrec_jax.federated import sharding
from fellrec_jax.federated import split_learning
from fellrec_jax.federated import training
from fellrec_jax.model import split as split_lib
from fellrec_jax.run import distributed
from fellrec_jax.run.setup import Run
from fellrec_jax.run.state import ServerState, TrainState


def aggregator_spec(run: Run) -> aggregation.AggregatorSpec:
  f, fed = run.config.fellrec, run.config.fed
  return aggregation.AggregatorSpec(
      name=run.aggregator, alpha=f.alpha, beta=f.beta, temperature=f.temperature,
      skip_warm_when_beta_is_1=f.skip_warm_when_beta_is_1, sequential_update=f.sequential_update,
      server_layers=tuple(bool(x) for x in split_lib.server_layer_mask(run.model_cfg, fed.split_k)),
      shared_server_adapters=fed.server_adapters == "shared")


def aggregate(run: Run, adapters, train_loss, heat: heating.HeatState, round_index: int):
  """(mixed adapters, mixing matrix [C, C] for the log, new heat state, the adapters' similarity [C, C])
  for the configured aggregator."""
  return aggregation.aggregate(adapters, train_loss, heat, jnp.int32(round_index),
                               jnp.asarray(run.train_plan.num_examples, jnp.float32), spec=aggregator_spec(run))


# ----------------------------------------------------------------------------------------------------
# One round


def round_context(run: Run, state: TrainState, round_index: int) -> training.RoundContext:
  warmup = run.config.train.warmup_steps if round_index == 0 else 0
  scale = jnp.ones(run.num_train_clients, jnp.float32)
  if run.aggregator == "fellrec" and run.config.fellrec.heat_apply_to == "aggregation_and_local_lr":
    scale = state.server.heat.warm_weight  # the warm weights of the last aggregation (1 before the first)
  return training.RoundContext(jnp.int32(warmup), scale)


def train_clients(run: Run, clients, batches, anchors, ctx):
  """One local round; without anchors there is no proximal term (ditto's global models)."""
  lc = run.lc if anchors is not None else dataclasses.replace(run.lc, prox_mu=0.0)
  return training.local_round(run.base, clients, batches, run.data.prefix_ids, run.data.prefix_loss_mask,
                               anchors, ctx, lc=lc, lanes=run.lanes)


def eval_adapters(run: Run, adapters):
  """[C, ...] adapters to validate/evaluate: centralized broadcasts its one model to every client."""
  if run.num_train_clients == run.num_clients:
    return adapters
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (run.num_clients, *x.shape[1:])), adapters)


def validation_losses(run: Run, adapters, valid) -> np.ndarray:
  """[C] token-mean validation NLL of each client's adapters (nan for a client without validation data).

  Clients are validated `clients_per_chunk` at a time (the last chunk padded with masked copies), so that
  memory stays bounded with thousands of clients; in a multi-process run all at once, each process its own.
  """
  adapters = eval_adapters(run, adapters)
  C = run.num_clients
  chunk = run.config.fed.clients_per_chunk
  if not 0 < chunk < C or jax.process_count() > 1:
    total, count = training.validation_nll(run.base, adapters, valid, run.data.prefix_ids,
                                           run.data.prefix_loss_mask, lc=run.lc)
    total, count = (np.asarray(x, np.float64) for x in sharding.to_host((total, count)))
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)
  totals, counts = [], []
  for start in range(0, C, chunk):
    index = np.minimum(np.arange(start, start + chunk), C - 1)
    real = np.arange(start, start + chunk) < C
    part = jax.tree.map(lambda x: x[index], valid)
    part = part._replace(step_mask=part.step_mask & real[:, None])
    total, count = training.validation_nll(run.base, jax.tree.map(lambda x: x[index], adapters), part,
                                           run.data.prefix_ids, run.data.prefix_loss_mask, lc=run.lc)
    totals.append(np.asarray(total, np.float64)[real])
    counts.append(np.asarray(count, np.float64)[real])
  total, count = np.concatenate(totals), np.concatenate(counts)
  return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def run_round(run: Run, state: TrainState, round_index: int, valid) -> tuple[TrainState, dict]:
  start = time.perf_counter()
  batches = client_data(run, lambda clients: batching.round_batches(run.train_plan, round_index, clients))
  ctx = round_context(run, state, round_index)
  server = state.server
  global_clients = state.global_clients
  similarity = None
  if run.aggregator == "ditto":
    received = jax.tree.map(jnp.copy, global_clients.adapters)  # w^t, the anchor of the personal models
    global_clients, _ = train_clients(run, global_clients, batches, None, ctx)
    mixed_global = aggregation.mix(global_clients.adapters, aggregation.fedavg_matrix(run.train_plan.num_examples))
    global_clients = global_clients._replace(adapters=mixed_global)
    clients, metrics = train_clients(run, state.clients, batches, received, ctx)
    matrix, heat = aggregation.fedavg_matrix(run.train_plan.num_examples), server.heat
    adapters = clients.adapters
  else:
    anchors = jax.tree.map(jnp.copy, state.clients.adapters) if run.aggregator == "fedprox" else None
    clients, metrics = train_clients(run, state.clients, batches, anchors, ctx)
    adapters, matrix, heat, similarity = aggregate(run, clients.adapters, metrics.train_loss, server.heat,
                                                   round_index)
  clients = clients._replace(adapters=adapters)
  val = validation_losses(run, adapters, valid)
  weighted = weighted_val_loss(run, val)
  state, improved = update_best(run, TrainState(clients, global_clients, state.best_adapters, server), val,
                                weighted, round_index, heat)
  record = round_record(run, round_index, metrics, val, weighted, improved, matrix, heat, ctx.lr_scale, batches,
                        adapters, time.perf_counter() - start, similarity if run.aggregator == "fellrec" else None)
  return state, record


def client_data(run: Run, build, num_clients: int | None = None) -> training.ClientBatches:
  """`build(clients)`'s batches of this process's clients, as global arrays sharded over `clients`."""
  num_clients = run.num_train_clients if num_clients is None else num_clients
  local = distributed.local_clients(run.mesh, num_clients)
  return sharding.put_local_clients(training.batches_from(build(local)), run.mesh, num_clients)


def weighted_val_loss(run: Run, val: np.ndarray) -> float:
  """Clients' validation losses weighted by their validation examples (the reference's early-stop signal)."""
  n_val = run.data.num_valid_examples.astype(np.float64)
  has_val = ~np.isnan(val)
  return float(np.sum(np.where(has_val, val, 0) * n_val) / max(n_val[has_val].sum(), 1))


def update_best(run: Run, state: TrainState, val: np.ndarray, weighted: float, round_index: int, heat):
  """Keep each client's best adapters (by its own validation loss) and track early stopping."""
  server = state.server
  best_val = np.asarray(server.best_val)
  has_val = ~np.isnan(val)
  improved = np.where(has_val, val < best_val, True)  # a client without validation data keeps its latest
  adapters = eval_adapters(run, state.clients.adapters)
  pick = lambda new, old: jnp.where(improved.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
  best_adapters = jax.tree.map(pick, adapters, state.best_adapters)
  better = weighted < float(server.best_weighted)
  stale = 0 if better else int(server.stale_rounds) + 1
  stopped = stale >= run.config.fed.patience and round_index > run.config.fed.min_rounds
  server = ServerState(
      rounds_done=jnp.int32(round_index + 1), heat=heat,
      best_val=jnp.asarray(np.where(improved & has_val, val, best_val), jnp.float32),
      best_round=jnp.asarray(np.where(improved, round_index, np.asarray(server.best_round)), jnp.int32),
      best_weighted=jnp.float32(min(weighted, float(server.best_weighted))), stale_rounds=jnp.int32(stale),
      stopped=jnp.bool_(stopped))
  server = sharding.replicate(server, run.mesh)  # a global value on every device (as Orbax saves it)
  return state._replace(best_adapters=best_adapters, server=server), improved


def mean_learning_rates(run: Run, round_index: int, lr_scale) -> np.ndarray:
  """[C] mean learning rate over each client's real steps this round."""
  steps = run.train_plan.client_steps
  warmup = run.config.train.warmup_steps if round_index == 0 else 0
  opt = run.lc.optimizer
  means = [float(np.mean(optimizer_lib.learning_rate(opt, np.arange(n), n, warmup))) if n else 0.0 for n in steps]
  return np.asarray(means) * np.asarray(lr_scale)


def comm_bytes(run: Run, batches: training.ClientBatches, metrics, adapters) -> dict:
  """Bytes crossing the client/server boundary (activations + gradients) and the adapter exchange."""
  R, T = batches.tokens.shape[2:]
  per_micro = split_learning.boundary_bytes(R // run.lc.accum_steps, T, len(run.data.prefix_ids), run.lc.split)
  models = 2 if run.aggregator == "ditto" else 1
  split = int(np.sum(np.asarray(metrics.num_steps))) * run.lc.accum_steps * per_micro * models
  exchanged = 0
  if run.aggregator not in ("local", "centralized"):
    # Each client uploads the adapters of its own layers and downloads the mixed ones.
    client_layers = split_lib.num_client_layers(run.model_cfg, run.config.fed.split_k)
    per_layer = sum(math.prod(x.shape[2:]) * x.dtype.itemsize for x in jax.tree.leaves(adapters))
    exchanged = 2 * per_layer * client_layers * run.num_train_clients
  return {"split_activations_and_gradients": split, "adapter_upload_and_download": exchanged,
          "total": split + exchanged}


def round_record(run, round_index, metrics, val, weighted, improved, matrix, heat, lr_scale, batches, adapters,
                 seconds, similarity=None) -> dict:
  metrics, matrix, heat, similarity = sharding.to_host((metrics, matrix, heat, similarity))
  loss = np.asarray(metrics.train_loss, np.float64)
  steps = np.asarray(metrics.num_steps)
  warm = np.asarray(heat.warm_weight) if run.aggregator == "fellrec" else np.ones(run.num_train_clients)
  lr = mean_learning_rates(run, round_index, lr_scale)
  n_train, n_valid = run.train_plan.num_examples, run.data.num_valid_examples
  clients = []
  for c in range(run.num_clients):
    t = c if run.num_train_clients == run.num_clients else 0
    clients.append({
        "client": c, "train_loss": float(loss[t]), "val_loss": json_float(val[c]), "lr": float(lr[t]),
        "warm_weight": float(warm[t]), "num_steps": int(steps[t]), "train_examples": int(n_train[t]),
        "valid_examples": int(n_valid[c]), "improved": bool(improved[c])})
  comm = comm_bytes(run, batches, metrics, adapters)
  return {"round": round_index, "clients": clients, "aggregation": np.asarray(matrix).round(6).tolist(),
          "val_loss_weighted": weighted, "comm_bytes": comm["total"], "comm_detail": comm,
          "label_tokens": int(np.sum(np.asarray(metrics.label_tokens))), "seconds": round(seconds, 3),
          "similarity_offdiag_mean": offdiag_mean(similarity)}


def offdiag_mean(matrix) -> float | None:
  """The mean of a [C, C] matrix's off-diagonal entries (FELLRec's similarity; None without one)."""
  if matrix is None or len(matrix) < 2:
    return None
  matrix = np.asarray(matrix, np.float64)
  return float((matrix.sum() - np.trace(matrix)) / (matrix.size - len(matrix)))


def json_float(x):
  """x for JSON: None for a missing or non-finite value."""
  return None if x is None or not math.isfinite(float(x)) else float(x)


