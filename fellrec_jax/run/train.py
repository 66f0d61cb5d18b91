"""A federated run from a config: data, base model, rounds of local training + aggregation + validation,
checkpoints, metrics.jsonl, and the final evaluation. `experiments/train.py` is the thin entry point.

Per round t (docs/method.md §4): every client trains locally (one jitted call for all clients), the server mixes
the adapters with the configured aggregator, each client's mixed adapters are validated, the best ones per
client are kept (the reference's model selection), and the weighted validation loss drives early stopping.
Re-running on the same workdir resumes from the last checkpoint and ends exactly where an uninterrupted
run ends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from fellrec_jax.federated import aggregation
from fellrec_jax.data import batching
from fellrec_jax.run import checkpoint
from fellrec_jax.run import evaluate as evaluation
from fellrec_jax.federated import rounds as federated
from fellrec_jax.federated import heating
from fellrec_jax.model import hf_interop
from fellrec_jax.model import lora as lora_lib
from fellrec_jax.model import llama as model_lib
from fellrec_jax.model import split as split_lib
from fellrec_jax.federated import optimizer as optimizer_lib
from fellrec_jax.data import pipeline
from fellrec_jax.run import pretrain
from fellrec_jax.federated import sharding
from fellrec_jax.federated import split_learning

logger = logging.getLogger("fellrec_jax")

AGGREGATORS = ("fellrec", "fedavg", "fedprox", "ditto", "local", "centralized")
# Fields that may differ when a run is resumed: they do not change the numbers of the rounds already run.
RESUMABLE_FIELDS = ("max_rounds_per_run", "checkpoint_every", "keep_checkpoints", "eval")


class ServerState(NamedTuple):
  rounds_done: jax.Array  # int32: completed rounds
  heat: heating.HeatState  # FELLRec's curriculum-heating state (round counter, last warm weights)
  best_val: jax.Array  # [C] best validation loss of each client
  best_round: jax.Array  # [C] round of that best (-1: none yet)
  best_weighted: jax.Array  # best weighted validation loss (early stopping)
  stale_rounds: jax.Array  # int32: rounds since the weighted loss last improved
  stopped: jax.Array  # bool: early stopping fired


class TrainState(NamedTuple):
  clients: federated.ClientStates  # the models clients train and are evaluated with (personal for ditto)
  global_clients: Any  # ditto: each client's copy of the global model (ClientStates); else None
  best_adapters: Any  # [C, ...] each client's best adapters so far
  server: ServerState


@dataclasses.dataclass
class Run:
  """Everything set up for training (host-side)."""

  config: ml_collections.ConfigDict
  workdir: Path
  data: pipeline.FederatedData
  model_cfg: model_lib.LlamaConfig
  lcfg: lora_lib.LoraConfig
  lc: federated.LocalConfig
  base: Any
  mesh: Any
  train_plan: batching.BatchPlan  # the plan training batches come from (one merged client if centralized)
  num_train_clients: int

  @property
  def num_clients(self) -> int:
    return self.data.num_clients

  @property
  def aggregator(self) -> str:
    return self.config.fed.aggregator


# ----------------------------------------------------------------------------------------------------
# Setup


def validate_config(config) -> None:
  """Clear errors for impossible configs before any work is done."""
  fed = config.fed
  if fed.aggregator not in AGGREGATORS:
    raise ValueError(f"fed.aggregator={fed.aggregator!r} is unknown; choose from {AGGREGATORS}")
  for name in ("rounds", "local_epochs", "stream_groups"):
    if fed[name] < 1:
      raise ValueError(f"fed.{name} must be >= 1, got {fed[name]}")
  if fed.num_clients < 1 and not (fed.num_clients == 0 and config.data.partition == "per_user"):
    raise ValueError(f"fed.num_clients must be >= 1 (or 0 with data.partition=per_user: one client per "
                     f"user), got {fed.num_clients}")
  if fed.server_adapters not in ("per_client", "shared"):
    raise ValueError(f"fed.server_adapters must be 'per_client' or 'shared', got {fed.server_adapters!r}")
  if config.fellrec.heat_apply_to not in ("aggregation", "aggregation_and_local_lr"):
    raise ValueError("fellrec.heat_apply_to must be 'aggregation' or 'aggregation_and_local_lr', got "
                     f"{config.fellrec.heat_apply_to!r}")
  if config.fellrec.temperature <= 0 or config.fellrec.beta <= 0:
    raise ValueError("fellrec.temperature and fellrec.beta must be > 0")
  if config.train.accum_steps < 1:
    raise ValueError(f"train.accum_steps must be >= 1, got {config.train.accum_steps}")
  if config.checkpoint_every < 1:
    raise ValueError(f"checkpoint_every must be >= 1, got {config.checkpoint_every}")


def setup_logging(workdir: Path) -> None:
  logger.setLevel(logging.INFO)
  if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == workdir / "train.log"
             for h in logger.handlers):
    handler = logging.FileHandler(workdir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
  if not logging.getLogger().handlers and not any(type(h) is logging.StreamHandler for h in logger.handlers):
    stream = logging.StreamHandler()  # nobody prints our records yet (no root handler)
    stream.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.addHandler(stream)


def load_base(config, data: pipeline.FederatedData, workdir: Path):
  """(LlamaConfig, base params): the configured HF checkpoint, or the tiny base pretrained on the titles."""
  tokenizer = data.tokenizer
  if config.model.hf_dir:
    cfg, base = hf_interop.load_llama(config.model.hf_dir, dtype=config.model.dtype)
    if len(tokenizer) > cfg.vocab_size:
      raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but {config.model.hf_dir} has vocab_size "
                       f"{cfg.vocab_size}: set data.tokenizer_path to the checkpoint's tokenizer")
    return cfg, base
  m = config.model
  cfg = model_lib.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
      head_dim=m.hidden_size // m.num_heads, rope_theta=m.rope_theta,
      max_position_embeddings=m.max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=data.pad_id, dtype=m.dtype)
  p = config.pretrain
  return pretrain.load_or_pretrain(p.get("cache_dir") or workdir / "base_model", cfg, tokenizer, data.dataset.catalog,
                                   steps=p.steps, rows=p.rows, row_len=p.row_len,
                                   learning_rate=p.learning_rate, seed=config.seed)


def local_config(config, model_cfg, lcfg) -> federated.LocalConfig:
  t = config.train
  opt = optimizer_lib.OptimizerConfig(
      learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, schedule=t.schedule,
      weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, fresh_each_round=t.fresh_optimizer)
  split = split_learning.SplitConfig(model_cfg, lcfg, config.fed.split_k, config.model.loss_chunk,
                                     config.model.remat)
  prox = {"fedprox": config.fed.prox_mu, "ditto": config.fed.ditto_lambda}.get(config.fed.aggregator, 0.0)
  return federated.LocalConfig(split, opt, config.train.accum_steps, prox, config.fed.stream_groups)


def setup(config, workdir) -> Run:
  validate_config(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  setup_logging(workdir)
  mesh = sharding.make_mesh(config.mesh.clients, config.mesh.model)
  data = pipeline.build_federated_data(
      config.data, num_clients=config.fed.num_clients, seed=config.seed, workdir=workdir,
      local_epochs=config.fed.local_epochs, rows_multiple=config.train.accum_steps, num_rounds=config.fed.rounds)
  model_cfg, base = load_base(config, data, workdir)
  split_lib.check_split(model_cfg, config.fed.split_k)
  lcfg = lora_lib.LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
                             targets=tuple(config.lora.targets))
  lc = local_config(config, model_cfg, lcfg)
  plan = data.train_plan
  if config.fed.aggregator == "centralized":
    plan = merged_plan(data, config)
  if data.num_clients % config.mesh.clients:
    logger.warning("%d clients do not divide mesh.clients=%d: client state is replicated, not sharded",
                   data.num_clients, config.mesh.clients)
  base = sharding.put_base(base, mesh)
  return Run(config, workdir, data, model_cfg, lcfg, lc, base, mesh, plan, plan.num_clients)


def merged_plan(data: pipeline.FederatedData, config) -> batching.BatchPlan:
  """The centralized baseline: one client holding every client's training examples."""
  prefix = data.prefix_ids
  merged = [(np.concatenate([prefix, ids]).astype(np.int32),
             np.concatenate([data.prefix_loss_mask, mask]).astype(np.float32))
            for suffixes in data.train_plan.suffixes for ids, mask in suffixes]
  p = data.train_plan
  return batching.make_plan([merged], prefix_len=p.prefix_len, batch_size=p.batch_size,
                            local_epochs=p.local_epochs, seed=config.seed, num_rounds=p.num_rounds,
                            row_len=p.row_len, rows_multiple=config.train.accum_steps, pad_id=p.pad_id)


def init_state(run: Run) -> TrainState:
  config = run.config
  key_adapters, key_clients, key_global = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  one = lora_lib.init_adapters(run.model_cfg, run.lcfg, key_adapters)  # every client starts from the same
  stack = lambda n: jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)).copy(), one)
  clients = federated.init_client_states(stack(run.num_train_clients), run.lc, key_clients)
  global_clients = None
  if run.aggregator == "ditto":
    global_clients = federated.init_client_states(stack(run.num_train_clients), run.lc, key_global)
  C = run.num_clients
  server = ServerState(
      rounds_done=jnp.int32(0), heat=heating.HeatState(jnp.int32(0), jnp.ones(C, jnp.float32)),
      best_val=jnp.full(C, jnp.inf, jnp.float32), best_round=jnp.full(C, -1, jnp.int32),
      best_weighted=jnp.float32(jnp.inf), stale_rounds=jnp.int32(0), stopped=jnp.bool_(False))
  state = TrainState(clients, global_clients, stack(C), server)
  return place(run, state)


def place(run: Run, state: TrainState) -> TrainState:
  """Client-stacked parts sharded over the mesh's `clients` axis; the server state replicated."""
  put = lambda tree: sharding.put_clients(tree, run.mesh)
  return TrainState(put(state.clients), None if state.global_clients is None else put(state.global_clients),
                    put(state.best_adapters), sharding.replicate(state.server, run.mesh))


# ----------------------------------------------------------------------------------------------------
# Aggregation


def aggregator_spec(run: Run) -> aggregation.AggregatorSpec:
  f, fed = run.config.fellrec, run.config.fed
  return aggregation.AggregatorSpec(
      name=run.aggregator, alpha=f.alpha, beta=f.beta, temperature=f.temperature,
      skip_warm_when_beta_is_1=f.skip_warm_when_beta_is_1, sequential_update=f.sequential_update,
      server_layers=tuple(bool(x) for x in split_lib.server_layer_mask(run.model_cfg, fed.split_k)),
      shared_server_adapters=fed.server_adapters == "shared")


def aggregate(run: Run, adapters, train_loss, heat: heating.HeatState, round_index: int):
  """(mixed adapters, mixing matrix [C, C] for the log, new heat state) for the configured aggregator."""
  return aggregation.aggregate(adapters, train_loss, heat, jnp.int32(round_index),
                               jnp.asarray(run.train_plan.num_examples, jnp.float32), spec=aggregator_spec(run))


# ----------------------------------------------------------------------------------------------------
# One round


def round_context(run: Run, state: TrainState, round_index: int) -> federated.RoundContext:
  warmup = run.config.train.warmup_steps if round_index == 0 else 0
  scale = jnp.ones(run.num_train_clients, jnp.float32)
  if run.aggregator == "fellrec" and run.config.fellrec.heat_apply_to == "aggregation_and_local_lr":
    scale = state.server.heat.warm_weight  # the warm weights of the last aggregation (1 before the first)
  return federated.RoundContext(jnp.int32(warmup), scale)


def train_clients(run: Run, clients, batches, anchors, ctx):
  """One local round; without anchors there is no proximal term (ditto's global models)."""
  lc = run.lc if anchors is not None else dataclasses.replace(run.lc, prox_mu=0.0)
  return federated.local_round(run.base, clients, batches, run.data.prefix_ids, run.data.prefix_loss_mask,
                               anchors, ctx, lc=lc, lanes=run.config.fed.clients_per_chunk)


def eval_adapters(run: Run, adapters):
  """[C, ...] adapters to validate/evaluate: centralized broadcasts its one model to every client."""
  if run.num_train_clients == run.num_clients:
    return adapters
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (run.num_clients, *x.shape[1:])), adapters)


def validation_losses(run: Run, adapters, valid) -> np.ndarray:
  """[C] token-mean validation NLL of each client's adapters (nan for a client without validation data).

  Clients are validated `clients_per_chunk` at a time (the last chunk padded with masked copies), so that
  memory stays bounded with thousands of clients.
  """
  adapters = eval_adapters(run, adapters)
  C = run.num_clients
  chunk = run.config.fed.clients_per_chunk if 0 < run.config.fed.clients_per_chunk < C else C
  totals, counts = [], []
  for start in range(0, C, chunk):
    index = np.minimum(np.arange(start, start + chunk), C - 1)
    real = np.arange(start, start + chunk) < C
    part = jax.tree.map(lambda x: x[index], valid)
    part = part._replace(step_mask=part.step_mask & real[:, None])
    total, count = federated.validation_nll(run.base, jax.tree.map(lambda x: x[index], adapters), part,
                                            run.data.prefix_ids, run.data.prefix_loss_mask, lc=run.lc)
    totals.append(np.asarray(total, np.float64)[real])
    counts.append(np.asarray(count, np.float64)[real])
  total, count = np.concatenate(totals), np.concatenate(counts)
  return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def run_round(run: Run, state: TrainState, round_index: int, valid) -> tuple[TrainState, dict]:
  start = time.perf_counter()
  batches = federated.batches_from(batching.round_batches(run.train_plan, round_index))
  batches = sharding.put_clients(batches, run.mesh)
  ctx = round_context(run, state, round_index)
  server = state.server
  global_clients = state.global_clients
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
    adapters, matrix, heat = aggregate(run, clients.adapters, metrics.train_loss, server.heat, round_index)
  clients = clients._replace(adapters=adapters)
  val = validation_losses(run, adapters, valid)
  weighted = weighted_val_loss(run, val)
  state, improved = update_best(run, TrainState(clients, global_clients, state.best_adapters, server), val,
                                weighted, round_index, heat)
  record = round_record(run, round_index, metrics, val, weighted, improved, matrix, heat, ctx.lr_scale, batches,
                        adapters, time.perf_counter() - start)
  return state, record


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
  return state._replace(best_adapters=best_adapters, server=server), improved


def mean_learning_rates(run: Run, round_index: int, lr_scale) -> np.ndarray:
  """[C] mean learning rate over each client's real steps this round."""
  steps = run.train_plan.client_steps
  warmup = run.config.train.warmup_steps if round_index == 0 else 0
  opt = run.lc.optimizer
  means = [float(np.mean(optimizer_lib.learning_rate(opt, np.arange(n), n, warmup))) if n else 0.0 for n in steps]
  return np.asarray(means) * np.asarray(lr_scale)


def comm_bytes(run: Run, batches: federated.ClientBatches, metrics, adapters) -> dict:
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
                 seconds) -> dict:
  loss = np.asarray(metrics.train_loss, np.float64)
  steps = np.asarray(metrics.num_steps)
  warm = np.asarray(heat.warm_weight) if run.aggregator == "fellrec" else np.ones(run.num_train_clients)
  lr = mean_learning_rates(run, round_index, lr_scale)
  n_train, n_valid = run.train_plan.num_examples, run.data.num_valid_examples
  clients = []
  for c in range(run.num_clients):
    t = c if run.num_train_clients == run.num_clients else 0
    clients.append({
        "client": c, "train_loss": float(loss[t]), "val_loss": _json_float(val[c]), "lr": float(lr[t]),
        "warm_weight": float(warm[t]), "num_steps": int(steps[t]), "train_examples": int(n_train[t]),
        "valid_examples": int(n_valid[c]), "improved": bool(improved[c])})
  comm = comm_bytes(run, batches, metrics, adapters)
  return {"round": round_index, "clients": clients, "aggregation": np.asarray(matrix).round(6).tolist(),
          "val_loss_weighted": weighted, "comm_bytes": comm["total"], "comm_detail": comm,
          "label_tokens": int(np.sum(np.asarray(metrics.label_tokens))), "seconds": round(seconds, 3)}


def _json_float(x):
  return None if x is None or not math.isfinite(float(x)) else float(x)


# ----------------------------------------------------------------------------------------------------
# The run


def config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


def resume_or_init(run: Run, mngr) -> TrainState:
  fresh = init_state(run)
  fingerprint = checkpoint.config_fingerprint(config_dict(run.config), RESUMABLE_FIELDS)
  restored = checkpoint.restore(mngr, checkpointable(fresh))
  if restored is None:
    return fresh
  step, saved, meta = restored
  checkpoint.check_resumable(meta["config"], fingerprint, run.workdir)
  logger.info("resuming %s from its checkpoint after round %d", run.workdir, step - 1)
  _truncate_metrics(run.workdir / "metrics.jsonl", step)
  return place(run, _from_checkpointable(saved, fresh))


def checkpointable(state: TrainState):
  """The state as Orbax stores it (no None: absent parts become empty dicts)."""
  clients = state.clients._asdict()
  clients["opt_state"] = clients["opt_state"] if clients["opt_state"] is not None else {}
  glob = {} if state.global_clients is None else state.global_clients._asdict()
  if glob and glob["opt_state"] is None:
    glob["opt_state"] = {}
  return {"clients": clients, "global_clients": glob, "best_adapters": state.best_adapters,
          "server": state.server._asdict() | {"heat": state.server.heat._asdict()}}


def _from_checkpointable(saved, like: TrainState) -> TrainState:
  def clients_from(d, like_clients):
    return federated.ClientStates(d["adapters"], d["opt_state"] if like_clients.opt_state is not None else None,
                                  d["rng"])
  server = dict(saved["server"])
  server["heat"] = heating.HeatState(**server["heat"])
  glob = None if like.global_clients is None else clients_from(saved["global_clients"], like.global_clients)
  return TrainState(clients_from(saved["clients"], like.clients), glob, saved["best_adapters"],
                    ServerState(**server))


def _truncate_metrics(path: Path, rounds_done: int) -> None:
  """Drop metrics of rounds after the checkpoint (written before an interruption), so they are redone."""
  if not path.exists():
    return
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  kept = [line for line in lines if json.loads(line)["round"] < rounds_done]
  path.write_text("".join(line + "\n" for line in kept))


def train(config, workdir) -> dict:
  """Run (or resume) the federated training of `config` in `workdir`; returns the summary."""
  run = setup(config, workdir)
  (run.workdir / "config.json").write_text(json.dumps(config_dict(config), indent=2))
  mngr = checkpoint.manager(run.workdir / "checkpoints", config.keep_checkpoints)
  state = resume_or_init(run, mngr)
  valid = sharding.put_clients(federated.batches_from(run.data.valid_batches()), run.mesh)
  fingerprint = checkpoint.config_fingerprint(config_dict(config), RESUMABLE_FIELDS)
  first = int(state.server.rounds_done)
  last = config.fed.rounds
  if config.max_rounds_per_run:
    last = min(last, first + config.max_rounds_per_run)
  rounds = range(first, last) if not bool(state.server.stopped) else range(0)
  progress = tqdm(rounds, desc="rounds", unit="round", initial=first, total=config.fed.rounds)
  for r in progress:
    state, record = run_round(run, state, r, valid)
    if config.eval.every and (r + 1) % config.eval.every == 0:
      record["eval"] = evaluation.evaluate(run, state.best_adapters, write=False)
    with open(run.workdir / "metrics.jsonl", "a") as f:
      f.write(json.dumps(record) + "\n")
    progress.set_postfix(train=f"{np.mean([c['train_loss'] for c in record['clients']]):.3f}",
                         val=f"{record['val_loss_weighted']:.3f}")
    losses = [c["train_loss"] for c in record["clients"]]
    shown = [round(x, 3) for x in losses] if len(losses) <= 10 else (
        f"{len(losses)} clients: min {min(losses):.3f}, mean {np.mean(losses):.3f}, max {max(losses):.3f}")
    logger.info("round %d: weighted val loss %.4f, train losses %s, %.1f s", r, record["val_loss_weighted"], shown,
                record["seconds"])
    done = bool(state.server.stopped) or r == last - 1
    if done or (r + 1) % config.checkpoint_every == 0:
      checkpoint.save(mngr, r + 1, checkpointable(state), {"config": fingerprint, "rounds_done": r + 1})
    if bool(state.server.stopped):
      logger.info("early stop after round %d: no better weighted validation loss for %d rounds", r,
                  int(state.server.stale_rounds))
      break
  progress.close()
  summary = summarize(run, state)
  (run.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  print(summary_table(summary))
  save_best_adapters(run, state)
  if config.eval.at_end:
    summary["eval"] = evaluation.evaluate(run, state.best_adapters)["overall"]
    (run.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
  return summary


def summarize(run: Run, state: TrainState) -> dict:
  server = state.server
  return {
      "rounds_done": int(server.rounds_done), "early_stopped": bool(server.stopped),
      "best_weighted_val_loss": _json_float(server.best_weighted),
      "clients": [{"client": c, "train_examples": int(run.data.num_train_examples[c]),
                   "valid_examples": int(run.data.num_valid_examples[c]),
                   "best_val_loss": _json_float(server.best_val[c]), "best_round": int(server.best_round[c])}
                  for c in range(run.num_clients)],
  }


def summary_table(summary: dict) -> str:
  lines = [f"rounds run: {summary['rounds_done']}" + (" (early stop)" if summary["early_stopped"] else ""),
           f"best weighted validation loss: {summary['best_weighted_val_loss']}",
           f"{'client':>6} {'train':>6} {'valid':>6} {'best val loss':>14} {'best round':>10}"]
  for c in summary["clients"]:
    best = "-" if c["best_val_loss"] is None else f"{c['best_val_loss']:.4f}"
    lines.append(f"{c['client']:>6} {c['train_examples']:>6} {c['valid_examples']:>6} {best:>14} "
                 f"{c['best_round']:>10}")
  return "\n".join(lines)


def save_best_adapters(run: Run, state: TrainState, max_clients: int = 64) -> None:
  """Each client's best adapters as a PEFT directory (workdir/adapters/client_<c>), for up to 64 clients."""
  if run.num_clients > max_clients:
    logger.info("%d clients: best adapters are in the Orbax checkpoint only (no PEFT export above %d)",
                run.num_clients, max_clients)
    return
  best = jax.tree.map(np.asarray, state.best_adapters)
  for c in range(run.num_clients):
    base_dir = run.config.model.hf_dir or run.config.pretrain.cache_dir or str(run.workdir / "base_model")
    hf_interop.save_peft_adapter(run.workdir / "adapters" / f"client_{c}", jax.tree.map(lambda x: x[c], best),
                                 run.lcfg, base_dir)
