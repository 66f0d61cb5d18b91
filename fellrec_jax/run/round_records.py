"""A round's metrics.jsonl record (docs/method.md §4, "Participation and faults"): per-client rows and the
mixing matrix, or, beyond log.metrics_clients clients, their summaries with the full arrays kept aside for
the run to save."""

from __future__ import annotations

import math

import jax
import numpy as np

from fellrec_jax.federated import optimizer as optimizer_lib
from fellrec_jax.federated import participation
from fellrec_jax.federated import sharding
from fellrec_jax.federated import split_learning
from fellrec_jax.federated import training
from fellrec_jax.model import split as split_lib

ARRAYS = "_arrays"  # the record's key of the arrays to save (train.log_round pops it: not in metrics.jsonl)
STATUSES = ("trained", "dropped", "non_finite", "absent", "retired")


def mean_learning_rates(run, round_index: int, lr_scale, clients: np.ndarray) -> np.ndarray:
  """[m] mean learning rate over the real steps of each of the round's participants `clients`."""
  steps = run.train_plan.client_steps[clients]
  warmup = run.config.train.warmup_steps if round_index == 0 else 0
  opt = run.lc.optimizer
  means = [float(np.mean(optimizer_lib.learning_rate(opt, np.arange(n), n, warmup))) if n else 0.0 for n in steps]
  return np.asarray(means) * np.asarray(lr_scale)


def comm_bytes(run, batches: training.ClientBatches, metrics, adapters, reporting: int) -> dict:
  """Bytes crossing the client/server boundary (activations + gradients, of every participant's steps) and
  the adapter exchange (of the `reporting` clients)."""
  R, T = batches.tokens.shape[2:]
  per_micro = split_learning.boundary_bytes(R // run.lc.accum_steps, T, len(run.data.prefix_ids), run.lc.split)
  models = 2 if run.aggregator == "ditto" else 1
  split = int(np.sum(np.asarray(metrics.num_steps))) * run.lc.accum_steps * per_micro * models
  exchanged = 0
  if run.aggregator not in ("local", "centralized"):
    # Each client uploads the adapters of its own layers and downloads the mixed ones.
    client_layers = split_lib.num_client_layers(run.model_cfg, run.config.fed.split_k)
    per_layer = sum(math.prod(x.shape[2:]) * x.dtype.itemsize for x in jax.tree.leaves(adapters))
    exchanged = 2 * per_layer * client_layers * reporting
  return {"split_activations_and_gradients": split, "adapter_upload_and_download": exchanged,
          "total": split + exchanged}


def client_status(outcome: participation.Outcome, retired: np.ndarray) -> np.ndarray:
  """[C_train] each client's part in the round: trained | dropped | non_finite | absent | retired."""
  status = np.where(retired, "retired", "absent").astype(object)
  part, roster = outcome.roster.participants, outcome.roster
  status[part] = np.where(roster.dropped, "dropped", np.where(outcome.finite, "trained", "non_finite"))
  return status


def client_arrays(run, round_index, metrics, val, improved, server, lr_scale, outcome) -> dict[str, np.ndarray]:
  """[C] arrays of the per-client fields of a round (nan train_loss where a client did not train)."""
  part = outcome.roster.participants
  C_train, C = run.num_train_clients, run.num_clients
  loss, lr, steps = np.full(C_train, np.nan), np.zeros(C_train), np.zeros(C_train, np.int64)
  loss[part] = np.where(outcome.finite, np.asarray(metrics.train_loss, np.float64), np.nan)
  steps[part] = np.asarray(metrics.num_steps)
  lr[part] = mean_learning_rates(run, round_index, lr_scale, part)
  warm = np.asarray(server.heat.warm_weight, np.float64) if run.aggregator == "fellrec" else np.ones(C_train)
  status = client_status(outcome, np.asarray(server.retired))
  t = np.arange(C) if C_train == C else np.zeros(C, np.int64)  # centralized: its one model for every client
  return {"client": np.arange(C), "status": status[t].astype(str), "train_loss": loss[t],
          "val_loss": np.asarray(val, np.float64), "lr": lr[t], "warm_weight": warm[t], "num_steps": steps[t],
          "train_examples": np.asarray(run.train_plan.num_examples)[t],
          "valid_examples": np.asarray(run.data.num_valid_examples), "improved": np.asarray(improved, bool)}


def client_rows(arrays: dict[str, np.ndarray]) -> list[dict]:
  """One metrics.jsonl row per client."""
  convert = {"client": int, "status": str, "train_loss": json_float, "val_loss": json_float, "lr": float,
             "warm_weight": float, "num_steps": int, "train_examples": int, "valid_examples": int, "improved": bool}
  return [{name: convert[name](arrays[name][c]) for name in convert} for c in range(len(arrays["client"]))]


def stats(values) -> dict | None:
  """min/mean/max of the finite values (None when there are none)."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if not len(values):
    return None
  return {"min": float(values.min()), "mean": float(values.mean()), "max": float(values.max())}


def clients_summary(arrays: dict[str, np.ndarray]) -> dict:
  """The per-client rows of a round summarised: counts by status, min/mean/max of the losses, rates and warm
  weights, and totals."""
  status = arrays["status"]
  trained = status == "trained"
  return {"count": len(status), "status": {s: int(np.sum(status == s)) for s in STATUSES if np.any(status == s)},
          "train_loss": stats(arrays["train_loss"][trained]), "val_loss": stats(arrays["val_loss"]),
          "lr": stats(arrays["lr"][trained]), "warm_weight": stats(arrays["warm_weight"]),
          "num_steps": int(arrays["num_steps"].sum()), "improved": int(arrays["improved"].sum())}


def matrix_summary(matrix: np.ndarray, block: int = 1024) -> dict:
  """A mixing matrix summarised: its size, its diagonal and off-diagonal entries' min/mean/max (in blocks of
  rows, without a copy of the matrix: it may be 10,000 x 10,000)."""
  n = len(matrix)
  diagonal = np.diagonal(matrix).astype(np.float64)
  if n < 2:
    return {"size": n, "diagonal": stats(diagonal), "off_diagonal": None}
  low, high, total = np.inf, -np.inf, 0.0
  for start in range(0, n, block):
    rows = np.array(matrix[start:start + block], np.float64)
    index = np.arange(len(rows))
    total += rows.sum() - rows[index, start + index].sum()
    rows[index, start + index] = np.inf
    low = min(low, rows.min())
    rows[index, start + index] = -np.inf
    high = max(high, rows.max())
  return {"size": n, "diagonal": stats(diagonal),
          "off_diagonal": {"min": float(low), "mean": float(total / (n * n - n)), "max": float(high)}}


def round_record(run, round_index, metrics, val, weighted, improved, matrix, server, lr_scale, batches, adapters,
                 seconds, outcome: participation.Outcome, similarity=None) -> dict:
  """The round's metrics.jsonl record. With more than log.metrics_clients clients (or participants) the
  per-client rows (or the mixing matrix) are summarised, and the record's ARRAYS entry holds the full
  arrays, which the run saves in <workdir>/rounds/round_<r>.npz."""
  metrics, matrix, server, similarity = sharding.to_host((metrics, matrix, server, similarity))
  limit = run.config.log.get("metrics_clients", 100)
  part, roster = outcome.roster.participants, outcome.roster
  arrays = client_arrays(run, round_index, metrics, val, improved, server, lr_scale, outcome)
  matrix = np.asarray(matrix, np.float32)
  comm = comm_bytes(run, batches, metrics, adapters, int(outcome.include.sum()))
  record = {"round": round_index}
  if len(arrays["client"]) <= limit:
    record["clients"] = client_rows(arrays)
  else:
    record["clients_summary"] = clients_summary(arrays)
  if len(matrix) <= limit:
    record["aggregation"] = matrix.astype(np.float64).round(6).tolist()
  else:
    record["aggregation_summary"] = matrix_summary(matrix)
  record.update({"val_loss_weighted": weighted, "comm_bytes": comm["total"], "comm_detail": comm,
                 "label_tokens": int(np.sum(np.asarray(metrics.label_tokens))), "seconds": round(seconds, 3),
                 "similarity_offdiag_mean": offdiag_mean(similarity, outcome.include)})
  if not roster.everyone or not outcome.include.all():
    ids = {"participants": part, "dropped": part[roster.dropped], "non_finite": part[~outcome.finite]}
    for name, values in ids.items():  # "participants": the rows and columns of "aggregation"
      record[name] = [int(c) for c in values] if len(values) <= limit else {"count": len(values)}
  if "clients" not in record or "aggregation" not in record:
    record[ARRAYS] = {**arrays, "aggregation": matrix, "participants": part}
  return record


def offdiag_mean(matrix, include=None) -> float | None:
  """The mean of a [C, C] matrix's off-diagonal entries (FELLRec's similarity; None without one), over the
  `include`d clients' rows and columns."""
  if matrix is None:
    return None
  matrix = np.asarray(matrix)
  if include is not None and not np.all(include):
    matrix = matrix[np.ix_(include, include)]
  if len(matrix) < 2:
    return None
  return float((matrix.sum(dtype=np.float64) - np.trace(matrix, dtype=np.float64)) / (matrix.size - len(matrix)))


def json_float(x):
  """x for JSON: None for a missing or non-finite value."""
  return None if x is None or not math.isfinite(float(x)) else float(x)
