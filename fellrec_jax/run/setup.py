"""A run's setup from its config: the data, the base model, the device mesh, local training's settings."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import ml_collections
import numpy as np

from fellrec_jax.data import batching
from fellrec_jax.data import pipeline
from fellrec_jax.data import synthetic
from fellrec_jax.evaluation import recommend
from fellrec_jax.federated import optimizer as optimizer_lib
from fellrec_jax.federated import participation
from fellrec_jax.federated import sharding
from fellrec_jax.federated import split_learning
from fellrec_jax.federated import training
from fellrec_jax.model import hf_interop
from fellrec_jax.model import llama as model_lib
from fellrec_jax.model import lora as lora_lib
from fellrec_jax.model import split as split_lib
from fellrec_jax.privacy import defences
from fellrec_jax.run import distributed
from fellrec_jax.run import pretrain
from fellrec_jax.run import tracking

logger = logging.getLogger("fellrec_jax")

AGGREGATORS = ("fellrec", "fedavg", "fedprox", "ditto", "local", "centralized")


@dataclasses.dataclass
class Run:
  """Everything set up for training (host-side)."""

  config: ml_collections.ConfigDict
  workdir: Path
  data: pipeline.FederatedData
  model_cfg: model_lib.LlamaConfig
  lcfg: lora_lib.LoraConfig
  lc: training.LocalConfig
  base: Any
  mesh: Any
  train_plan: batching.BatchPlan  # the plan training batches come from (one merged client if centralized)
  num_train_clients: int
  round_shapes: Any = None  # rounds.RoundShapes every round is padded to (rounds.plan_round_shapes); None: its own

  @property
  def num_clients(self) -> int:
    return self.data.num_clients

  @property
  def aggregator(self) -> str:
    return self.config.fed.aggregator

  @property
  def lanes(self) -> int:
    """Clients trained at once (0: all). A multi-process run trains all of each process's clients at once:
    lanes would reorder clients across processes."""
    return self.config.fed.clients_per_chunk if jax.process_count() == 1 else 0


# ----------------------------------------------------------------------------------------------------
# Setup


def validate_config(config) -> None:
  """Clear errors for impossible configs before any work is done."""
  fed = config.fed
  if fed.aggregator not in AGGREGATORS:
    raise ValueError(f"fed.aggregator={fed.aggregator!r} is unknown; choose from {AGGREGATORS}")
  for name in ("rounds", "local_epochs", "stream_groups", "stream_sizes"):
    if fed.get(name, 1) < 1:
      raise ValueError(f"fed.{name} must be >= 1, got {fed[name]}")
  if fed.num_clients < 1 and not (fed.num_clients == 0 and config.data.partition == "per_user"):
    raise ValueError(f"fed.num_clients must be >= 1 (or 0 with data.partition=per_user: one client per "
                     f"user), got {fed.num_clients}")
  if fed.adapter_init not in ("per_client", "shared"):
    raise ValueError(f"fed.adapter_init must be 'per_client' or 'shared', got {fed.adapter_init!r}")
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
  init = config.model.get("init_adapters")
  if init and not Path(init).is_dir():
    raise ValueError(f"model.init_adapters={init!r}: no such directory (a PEFT adapter directory, or one holding "
                     "client_<c>/ directories)")
  participation.check_config(config)
  tracking.check(config)
  check_training_fields(config)
  check_model_fields(config)


def check_training_fields(config) -> None:
  """The data, optimizer, checkpoint and evaluation fields (their types and ranges)."""
  at_least = {"data.batch_size": 1, "data.cutoff_len": 1, "data.vocab_size": 1, "data.eval_batch_size": 0,
              "data.max_train_samples": 0, "data.max_valid_samples": 0, "data.row_len": 0, "keep_checkpoints": 1,
              "train.warmup_steps": 0, "fed.patience": 0, "fed.min_rounds": 0, "max_rounds_per_run": 0,
              "eval.every": 0, "eval.num_beams": 1, "eval.max_new_tokens": 1, "eval.batch_size": 1,
              "eval.max_test_users": 0, "model.loss_chunk": 0}
  for field, low in at_least.items():
    value = _field(config, field)
    if value is not _ABSENT and (isinstance(value, bool) or not isinstance(value, int) or value < low):
      raise ValueError(f"{field} must be an integer >= {low}, got {value!r}")
  for field in ("train.learning_rate", "lora.alpha"):
    value = _field(config, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
      raise ValueError(f"{field} must be a number > 0, got {value!r}")
  if config.train.schedule not in ("linear", "constant"):
    raise ValueError(f"train.schedule must be 'linear' or 'constant', got {config.train.schedule!r}")
  if config.eval.mode not in recommend.MODES:
    raise ValueError(f"eval.mode={config.eval.mode!r} is unknown; choose from {recommend.MODES}")
  ks = config.eval.ks
  if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
    raise ValueError(f"eval.ks must be cut-offs >= 1, got {ks!r}")
  if not config.data.path:
    synthetic.check_config(config.data.synthetic)


def check_model_fields(config) -> None:
  """The model, LoRA and split fields, and the checkpoint's config.json when model.hf_dir is set (nothing
  is loaded or compiled)."""
  m = config.model
  if m.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {m.dtype!r}")
  try:
    lora_lib.LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
                        targets=tuple(config.lora.targets))
  except (TypeError, ValueError) as error:
    raise ValueError(f"lora: {error}") from None
  if m.hf_dir:
    if not Path(m.hf_dir).is_dir():
      raise ValueError(f"model.hf_dir={m.hf_dir!r}: no such directory (a Hugging Face Llama checkpoint)")
    num_layers = hf_interop.load_config(m.hf_dir).num_layers
  else:
    for field in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
      if isinstance(m[field], bool) or not isinstance(m[field], int) or m[field] < 1:
        raise ValueError(f"model.{field} must be an integer >= 1, got {m[field]!r}")
    if m.hidden_size % m.num_heads or m.num_heads % m.num_kv_heads:
      raise ValueError(f"model.num_heads={m.num_heads} must divide model.hidden_size={m.hidden_size}, and "
                       f"model.num_kv_heads={m.num_kv_heads} must divide model.num_heads")
    num_layers = m.num_layers
  split_lib.check_split(SimpleNamespace(num_layers=num_layers), config.fed.split_k)


_ABSENT = object()


def _field(config, dotted: str):
  """config's value at a dotted path; _ABSENT where a config (e.g. an older run's config.json) lacks it."""
  node = config
  for key in dotted.split("."):
    if key not in node:
      return _ABSENT
    node = node[key]
  return node


def setup_logging(workdir: Path) -> None:
  """Log to workdir/train.log (process 0 only) and to stderr; in a multi-process job every record says
  which process speaks."""
  logger.setLevel(logging.INFO)
  who = distributed.log_prefix()
  if distributed.is_main() and not any(
      isinstance(h, logging.FileHandler) and Path(h.baseFilename) == workdir / "train.log" for h in logger.handlers):
    handler = logging.FileHandler(workdir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
  if not logging.getLogger().handlers and not any(type(h) is logging.StreamHandler for h in logger.handlers):
    stream = logging.StreamHandler()  # nobody prints our records yet (no root handler)
    stream.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.addHandler(stream)
  if who and not getattr(logging.getLogRecordFactory(), "prefixes_process", False):
    _prefix_records(who)


def _prefix_records(prefix: str) -> None:
  """Our records (every fellrec_jax.* logger, whichever handler prints them) start with the process."""
  make = logging.getLogRecordFactory()

  def factory(*args, **kwargs):
    record = make(*args, **kwargs)
    if record.name.startswith("fellrec_jax"):
      record.msg = prefix + str(record.msg)
    return record

  factory.prefixes_process = True
  logging.setLogRecordFactory(factory)


def load_base(config, data: pipeline.FederatedData, workdir: Path):
  """(LlamaConfig, base params): the configured HF checkpoint, or the tiny base pretrained on the titles."""
  tokenizer = data.tokenizer
  if config.model.hf_dir:
    cfg = hf_interop.load_config(config.model.hf_dir, dtype=config.model.dtype)
    check_tokenizer(tokenizer, cfg, config.model.hf_dir)
    return cfg, hf_interop.load_params(config.model.hf_dir, cfg)
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


def check_tokenizer(tokenizer, cfg: model_lib.LlamaConfig, hf_dir) -> None:
  """Raise if the run's tokenizer cannot drive the checkpoint's model (ids beyond its vocabulary)."""
  where = Path(hf_dir) / "config.json"
  if len(tokenizer) > cfg.vocab_size:
    raise hf_interop.CheckpointError(
        f"{where}: vocab_size is {cfg.vocab_size} but the tokenizer has {len(tokenizer)} tokens: set "
        "data.tokenizer_path to the checkpoint's tokenizer")
  for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
    token = getattr(tokenizer, name, None)
    if token is not None and not 0 <= token < cfg.vocab_size:
      raise hf_interop.CheckpointError(f"{where}: the tokenizer's {name} {token} is outside vocab_size "
                                       f"{cfg.vocab_size}: set data.tokenizer_path to the checkpoint's tokenizer")


def local_config(config, model_cfg, lcfg) -> training.LocalConfig:
  t = config.train
  opt = optimizer_lib.OptimizerConfig(
      learning_rate=t.learning_rate, warmup_steps=t.warmup_steps, schedule=t.schedule,
      weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, fresh_each_round=t.fresh_optimizer)
  split = split_learning.SplitConfig(model_cfg, lcfg, config.fed.split_k, config.model.loss_chunk,
                                     config.model.remat, defences.from_config(config))
  prox = {"fedprox": config.fed.prox_mu, "ditto": config.fed.ditto_lambda}.get(config.fed.aggregator, 0.0)
  return training.LocalConfig(split, opt, config.train.accum_steps, prox, config.fed.stream_groups)


def setup(config, workdir) -> Run:
  validate_config(config)
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  setup_logging(workdir)
  mesh = sharding.make_mesh(config.mesh.clients, config.mesh.model)
  # The same data and base on every process: process 0 builds them (and writes the tokenizer, the dataset
  # and the pretrained base to the workdir), then the others, who find and read them.
  with distributed.main_first("setup"):
    data = pipeline.build_federated_data(
        config.data, num_clients=config.fed.num_clients, seed=config.seed, workdir=workdir,
        local_epochs=config.fed.local_epochs, rows_multiple=config.train.accum_steps,
        num_rounds=config.fed.rounds)
    model_cfg, base = load_base(config, data, workdir)
  split_lib.check_split(model_cfg, config.fed.split_k)
  lcfg = lora_lib.LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
                             targets=tuple(config.lora.targets))
  lc = local_config(config, model_cfg, lcfg)
  plan = data.train_plan
  if config.fed.aggregator == "centralized":
    plan = merged_plan(data, config)
  mesh_clients = mesh.shape["clients"]
  if plan.num_clients % mesh_clients:
    if jax.process_count() > 1 and config.mesh.clients > 1:
      raise sharding.MeshError(f"{plan.num_clients} training clients do not divide over mesh.clients="
                               f"{mesh_clients}: in a multi-process run each process holds whole clients; set "
                               "fed.num_clients (or mesh.clients) so that mesh.clients divides it")
    logger.warning("%d clients do not divide over the %d devices of the clients axis: every device holds every "
                   "client's state (replicated, not sharded)", plan.num_clients, mesh_clients)
  if jax.process_count() > 1 and config.fed.clients_per_chunk:
    logger.info("fed.clients_per_chunk=%d is not used in a multi-process run: each process trains all of its "
                "clients at once", config.fed.clients_per_chunk)
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


def config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


