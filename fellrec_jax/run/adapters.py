"""A run's LoRA adapters as PEFT directories: exported from its Orbax checkpoint for any number of clients
(`tools/export_adapters.py`), and read back as the adapters a run starts from (`model.init_adapters`).

An exported directory holds `client_<c>/adapter_config.json` + `adapter_model.safetensors` per client, whose
`base_model_name_or_path` is the run's base model as an absolute local path (or what --base_model says), so
`peft.AutoPeftModelForCausalLM.from_pretrained(out/"client_0")` loads base and adapters in one call.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from fellrec_jax.model import hf_interop
from fellrec_jax.model import lora as lora_lib
from fellrec_jax.run import checkpoint

logger = logging.getLogger("fellrec_jax")

WHICH = ("best", "last")  # each client's best adapters (by validation loss), or those of the last round


def parse_clients(spec: str | Sequence[int] | None, num_clients: int) -> list[int]:
  """Client ids from "all" / None, or ids and ranges such as "0,3,5-9" (or a list), each in [0, num_clients)."""
  if spec is None or (isinstance(spec, str) and spec.strip() in ("", "all")):
    return list(range(num_clients))
  ids = []
  parts = spec.split(",") if isinstance(spec, str) else [str(c) for c in spec]
  for part in (p.strip() for p in parts if str(p).strip()):
    try:
      low, _, high = part.partition("-")
      ids.extend(range(int(low), int(high or low) + 1))
    except ValueError:
      raise ValueError(f"--clients: {part!r} is not a client id or a range such as 5-9") from None
  outside = [c for c in ids if not 0 <= c < num_clients]
  if outside:
    raise ValueError(f"--clients: clients {outside[:5]} are not in the run's [0, {num_clients})")
  return sorted(set(ids))


def base_model_path(config, workdir) -> str:
  """The run's base model as `from_pretrained` takes it: model.hf_dir, else the tiny base it pretrained
  (pretrain.cache_dir or <workdir>/base_model), made absolute (relative paths are the run's, from its cwd)."""
  path = config.model.hf_dir or config.pretrain.get("cache_dir") or str(Path(workdir) / "base_model")
  return str(Path(path).resolve())


def lora_config(config) -> lora_lib.LoraConfig:
  """The run's LoRA settings (dropout off: exported adapters are for inference)."""
  return lora_lib.LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, dropout=0.0,
                             targets=tuple(config.lora.targets), use_rslora=bool(config.lora.get("use_rslora", False)))


def read_checkpoint_adapters(workdir, which: str = "best", step: int | None = None) -> tuple[int, dict]:
  """(step, client-stacked adapters [C, ...] as numpy) from the run's Orbax checkpoint (the latest by default).

  which = "best": each client's best adapters; "last": the adapters clients trained in the last round (a
  centralized run has one model: one row). Without `step`, a damaged latest checkpoint (a crash while it
  was written, a copy cut short) is skipped, with a warning, for the one before it; a given damaged step
  is an error. Nothing is moved or written.
  """
  if which not in WHICH:
    raise ValueError(f"which must be one of {WHICH}, got {which!r}")
  directory = (Path(workdir) / "checkpoints").resolve()
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory}: no checkpoints (is {workdir} the workdir of a train.py run?)")
  mngr = ocp.CheckpointManager(directory)
  steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
  if not steps or steps[0] not in mngr.all_steps():
    raise FileNotFoundError(f"{directory}: no checkpoint {'' if step is None else step} (steps: {mngr.all_steps()})")
  for s in steps:  # the last one left is fatal: a damaged oldest step is an error, not a silent None
    try:
      return s, _read_adapters(mngr, directory, s, which)
    except Exception as error:  # noqa: BLE001 (Orbax and json raise many kinds for a damaged file)
      checkpoint.skip_damaged(mngr, s, error, fatal=s == steps[-1], damaged=[])


def _read_adapters(mngr: ocp.CheckpointManager, directory: Path, step: int, which: str) -> dict:
  checkpoint.read_meta(mngr, step)  # refuses another layout version
  tree = ocp.StandardCheckpointer().metadata(directory / str(step) / "state").item_metadata
  part = tree["best_adapters"] if which == "best" else tree["clients"]["adapters"]
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), part)
  item = {"best_adapters": abstract} if which == "best" else {"clients": {"adapters": abstract}}
  restored = ocp.CheckpointManager(directory).restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))).state
  adapters = restored["best_adapters"] if which == "best" else restored["clients"]["adapters"]
  return jax.tree.map(np.asarray, adapters)


def write_client_adapters(out_dir, stacked, clients: Sequence[int], lcfg: lora_lib.LoraConfig,
                          base_model_name_or_path: str) -> list[Path]:
  """out_dir/client_<c>/ in PEFT's LoRA format for each of `clients` of client-stacked adapters [C, ...]."""
  out_dir = Path(out_dir)
  stacked = jax.tree.map(np.asarray, stacked)
  written = []
  for c in clients:
    path = out_dir / f"client_{c}"
    hf_interop.save_peft_adapter(path, jax.tree.map(lambda x: x[c], stacked), lcfg, base_model_name_or_path)
    written.append(path)
  return written


def export_adapters(workdir, out_dir, clients=None, which: str = "best", step: int | None = None,
                    base_model: str | None = None) -> list[Path]:
  """PEFT directories (out_dir/client_<c>) of a run's clients, from its checkpoint; returns them."""
  from fellrec_jax.run import evaluate as evaluation  # the run's config.json (evaluation reads it too)
  config = evaluation.load_config(workdir)
  step, stacked = read_checkpoint_adapters(workdir, which, step)
  rows = jax.tree.leaves(stacked)[0].shape[0]
  chosen = parse_clients(clients, rows)
  base = base_model or base_model_path(config, workdir)
  if not base_model and not (Path(base) / "config.json").is_file():
    logger.warning("%s has no config.json: set --base_model to what from_pretrained should load", base)
  written = write_client_adapters(out_dir, stacked, chosen, lora_config(config), base)
  logger.info("wrote %d PEFT adapter directories (%s, checkpoint after round %d) to %s", len(written), which,
              step - 1, out_dir)
  return written


def init_adapters(path, model_cfg, lcfg: lora_lib.LoraConfig, num_clients: int):
  """model.init_adapters: client-stacked adapters [num_clients, ...] from PEFT directories.

  `path` is one PEFT directory (every client starts from it), or a directory holding client_<c>/ for every
  client c < num_clients (each starts from its own). The adapters' LoRA settings must be the run's.
  """
  path = Path(path)
  if (path / "adapter_config.json").is_file():
    one = _load_checked(path, model_cfg, lcfg)
    return jax.tree.map(lambda x: np.broadcast_to(x, (num_clients, *x.shape)).copy(), one)
  if not path.is_dir():
    raise hf_interop.CheckpointError(f"model.init_adapters={os.fspath(path)!r}: no such directory")
  missing = [c for c in range(num_clients) if not (path / f"client_{c}" / "adapter_config.json").is_file()]
  if missing:
    raise hf_interop.CheckpointError(
        f"model.init_adapters={os.fspath(path)!r}: neither a PEFT directory (adapter_config.json) nor one holding "
        f"client_<c>/ for each of the run's {num_clients} clients (missing client_{missing[0]}"
        f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''})")
  per_client = [_load_checked(path / f"client_{c}", model_cfg, lcfg) for c in range(num_clients)]
  return jax.tree.map(lambda *xs: np.stack(xs), *per_client)


def _load_checked(adapter_dir: Path, model_cfg, lcfg: lora_lib.LoraConfig):
  theirs, adapters = hf_interop.load_peft_adapter(adapter_dir, model_cfg)
  where = adapter_dir / "adapter_config.json"
  for field, peft_name, ours, got in [("rank", "r", lcfg.rank, theirs.rank),
                                      ("alpha", "lora_alpha", float(lcfg.alpha), theirs.alpha),
                                      ("targets", "target_modules", sorted(lcfg.targets), sorted(theirs.targets)),
                                      ("use_rslora", "use_rslora", bool(lcfg.use_rslora), theirs.use_rslora)]:
    if ours != got:
      raise hf_interop.CheckpointError(f"{where}: {peft_name} is {got!r} but the run's lora.{field} is {ours!r} "
                                       "(model.init_adapters needs adapters of the run's LoRA settings)")
  return adapters
