"""The state of a run (client states, each client's best adapters, the server's), as it is checkpointed
and resumed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fellrec_jax import files
from fellrec_jax.federated import heating
from fellrec_jax.federated import sharding
from fellrec_jax.federated import training
from fellrec_jax.model import lora as lora_lib
from fellrec_jax.run import adapters as adapters_lib
from fellrec_jax.run import checkpoint
from fellrec_jax.run import distributed
from fellrec_jax.run.setup import Run, config_dict

logger = logging.getLogger("fellrec_jax")

# Fields that may differ when a run is resumed: they do not change the numbers of the rounds already run
# (fed.rounds may grow: a finished or stopped run then continues; it may not drop below the rounds run).
RESUMABLE_FIELDS = ("max_rounds_per_run", "checkpoint_every", "keep_checkpoints", "eval", "fed.rounds", "log")


class ServerState(NamedTuple):
  rounds_done: jax.Array  # int32: completed rounds
  heat: heating.HeatState  # FELLRec's curriculum-heating state (round counter, last warm weights)
  best_val: jax.Array  # [C] best validation loss of each client
  best_round: jax.Array  # [C] round of that best (-1: none yet)
  best_weighted: jax.Array  # best weighted validation loss (early stopping)
  stale_rounds: jax.Array  # int32: rounds since the weighted loss last improved
  stopped: jax.Array  # bool: early stopping fired
  last_val: jax.Array  # [C] the latest validation loss of each client's adapters (inf: not validated yet)
  bad_rounds: jax.Array  # [C_train] int32: consecutive rounds in which the client's training went non-finite
  retired: jax.Array  # [C_train] bool: stopped after fed.max_bad_rounds such rounds (trains no more)


class TrainState(NamedTuple):
  clients: training.ClientStates  # the models clients train and are evaluated with (personal for ditto)
  global_clients: Any  # ditto: each client's copy of the global model (ClientStates); else None
  best_adapters: Any  # [C, ...] each client's best adapters so far
  server: ServerState


def init_state(run: Run) -> TrainState:
  config = run.config
  key_adapters, key_clients, key_global = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  stack = lambda n: initial_adapters(run, key_adapters, n)
  clients = training.init_client_states(stack(run.num_train_clients), run.lc, key_clients)
  global_clients = None
  if run.aggregator == "ditto":  # each client's global model starts as its personal one
    global_clients = training.init_client_states(stack(run.num_train_clients), run.lc, key_global)
  C = run.num_clients
  server = ServerState(
      rounds_done=jnp.int32(0), heat=heating.HeatState(jnp.int32(0), jnp.ones(C, jnp.float32)),
      best_val=jnp.full(C, jnp.inf, jnp.float32), best_round=jnp.full(C, -1, jnp.int32),
      best_weighted=jnp.float32(jnp.inf), stale_rounds=jnp.int32(0), stopped=jnp.bool_(False),
      last_val=jnp.full(C, jnp.inf, jnp.float32), bad_rounds=jnp.zeros(run.num_train_clients, jnp.int32),
      retired=jnp.zeros(run.num_train_clients, bool))
  state = TrainState(clients, global_clients, stack(C), server)
  return place(run, state)


def initial_adapters(run: Run, key: jax.Array, num_clients: int):
  """Every client's first adapters [C, ...] (lora_b = 0, so every client starts from the base model).

  fed.adapter_init = "per_client": client c draws its own lora_a from fold_in(key, c), as the reference
  builds a fresh PEFT model per client; "shared": one draw from `key` for all. FELLRec's similarity is the
  cosine of the clients' adapters, so shared initial lora_a keep every similarity near 1 (near-uniform
  mixing); independent ones let it tell clients apart (metrics.jsonl logs similarity_offdiag_mean).
  model.init_adapters = a PEFT directory (for all clients) or one of client_<c>/ directories: those instead.
  """
  init_dir = (run.config.get("model") or {}).get("init_adapters")
  if init_dir:
    stacked = adapters_lib.init_adapters(init_dir, run.model_cfg, run.lcfg, num_clients)
    return jax.tree.map(jnp.asarray, stacked)
  init = lambda k: lora_lib.init_adapters(run.model_cfg, run.lcfg, k)
  if run.config.fed.adapter_init == "shared":
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients, *x.shape)).copy(), init(key))
  return jax.vmap(lambda c: init(jax.random.fold_in(key, c)))(jnp.arange(num_clients))


def place(run: Run, state: TrainState) -> TrainState:
  """Client-stacked parts sharded over the mesh's `clients` axis; the server state replicated."""
  put = lambda tree: sharding.put_clients(tree, run.mesh)
  return TrainState(put(state.clients), None if state.global_clients is None else put(state.global_clients),
                    put(state.best_adapters), sharding.replicate(state.server, run.mesh))


def resume_or_init(run: Run, mngr) -> TrainState:
  fresh = init_state(run)
  fingerprint = checkpoint.config_fingerprint(config_dict(run.config), RESUMABLE_FIELDS)
  damaged = []  # steps found unreadable: the run resumes from the newest readable one
  restored = checkpoint.restore(mngr, checkpointable(fresh), damaged=damaged,
                                check=lambda meta: checkpoint.check_resumable(meta["config"], fingerprint, run.workdir))
  step = 0 if restored is None else restored[0]
  if damaged:
    if distributed.is_main():
      checkpoint.set_aside(mngr, damaged)
    distributed.barrier("damaged_checkpoints_set_aside")
    mngr.reload()
  if restored is not None:
    if run.config.fed.rounds < step:
      raise checkpoint.ResumeError(f"{run.workdir} has run {step} rounds; fed.rounds={run.config.fed.rounds} "
                                   "cannot be fewer (raise it to continue the run)")
    logger.info("resuming %s from its checkpoint after round %d", run.workdir, step - 1)
  if distributed.is_main():  # rows of rounds the checkpoint does not hold are redone (none without one)
    truncate_metrics(run.workdir / "metrics.jsonl", step)
    files.remove_temporaries(run.workdir)  # of writes a crash interrupted
    checkpoint.remove_unfinished(mngr)
  return fresh if restored is None else place(run, from_checkpointable(restored[1], fresh))


def checkpointable(state: TrainState):
  """The state as Orbax stores it (no None: absent parts become empty dicts)."""
  clients = state.clients._asdict()
  clients["opt_state"] = clients["opt_state"] if clients["opt_state"] is not None else {}
  glob = {} if state.global_clients is None else state.global_clients._asdict()
  if glob and glob["opt_state"] is None:
    glob["opt_state"] = {}
  return {"clients": clients, "global_clients": glob, "best_adapters": state.best_adapters,
          "server": state.server._asdict() | {"heat": state.server.heat._asdict()}}


def from_checkpointable(saved, like: TrainState) -> TrainState:
  def clients_from(d, like_clients):
    return training.ClientStates(d["adapters"], d["opt_state"] if like_clients.opt_state is not None else None,
                                  d["rng"])
  server = dict(saved["server"])
  server["heat"] = heating.HeatState(**server["heat"])
  glob = None if like.global_clients is None else clients_from(saved["global_clients"], like.global_clients)
  return TrainState(clients_from(saved["clients"], like.clients), glob, saved["best_adapters"],
                    ServerState(**server))


def truncate_metrics(path: Path, rounds_done: int) -> None:
  """Drop metrics of rounds after the checkpoint (written before an interruption), so they are redone."""
  if path.exists():  # a last line torn by a crash is removed; the file is rewritten atomically
    files.filter_jsonl(path, lambda record: record["round"] < rounds_done)


