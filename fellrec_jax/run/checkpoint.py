"""Orbax checkpoints of a federated run: array state (client states, server state, best adapters) plus a
JSON part (round, config fingerprint, metrics so far). Data order needs no saving: round r's batches are a
function of (seed, r)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class ResumeError(ValueError):
  """A workdir whose checkpoint cannot be resumed with this config."""


def manager(directory, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                         create=True)
  return ocp.CheckpointManager(Path(directory).resolve(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, like: Any, step: int | None = None) -> tuple[int, Any, dict] | None:
  """(step, state shaped like `like`, meta) of the latest (or given) checkpoint; None if there is none."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                         meta=ocp.args.JsonRestore()))
  return step, restored.state, dict(restored.meta)


def config_fingerprint(config_dict: dict, ignore: tuple[str, ...]) -> dict:
  """The config without the fields that may change on resume (dotted paths), as sorted JSON-able dict."""
  flat = {}

  def walk(prefix, value):
    if isinstance(value, dict):
      for key in sorted(value):
        walk(f"{prefix}.{key}" if prefix else key, value[key])
    else:
      flat[prefix] = value

  walk("", json.loads(json.dumps(config_dict, default=str)))
  return {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in ignore)}


def check_resumable(saved: dict, current: dict, workdir) -> None:
  """Raise ResumeError naming every field whose value differs from the checkpointed run's."""
  keys = sorted(set(saved) | set(current))
  diffs = [f"  {k}: checkpoint has {saved.get(k, '<absent>')!r}, config has {current.get(k, '<absent>')!r}"
           for k in keys if saved.get(k) != current.get(k)]
  if diffs:
    raise ResumeError(f"{workdir} holds a checkpoint of a run with another config; use a new --workdir or "
                      "the same config. Differences:\n" + "\n".join(diffs))
