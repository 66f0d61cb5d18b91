"""Orbax checkpoints of a federated run: array state (client states, server state, best adapters) plus a
JSON part (round, config fingerprint, metrics so far, the state's layout version). Data order needs no
saving: round r's batches are a function of (seed, r).

Layout versions: 1 (no "layout" field) stored adapters as {projection: {"a", "b"}}; 2 stores the model's
NNX adapter state, {"layers": {block: {projection: {"lora_a", "lora_b"}}}}. A checkpoint of another layout
is refused with a message rather than converted: a run is cheap to restart next to it, and a converter
would have to follow every future change of the state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


LAYOUT_VERSION = 2


class ResumeError(ValueError):
  """A workdir whose checkpoint cannot be resumed with this config."""


def manager(directory, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                         create=True)
  return ocp.CheckpointManager(Path(directory).resolve(), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  meta = {**meta, "layout": LAYOUT_VERSION}
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, like: Any, step: int | None = None) -> tuple[int, Any, dict] | None:
  """(step, state shaped like `like`, meta) of the latest (or given) checkpoint; None if there is none."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  meta = dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
  layout = meta.get("layout", 1)
  if layout != LAYOUT_VERSION:
    raise ResumeError(
        f"{Path(mngr.directory) / str(step)}: checkpoint of state layout {layout}, written by another version "
        f"of fellrec_jax; this version reads layout {LAYOUT_VERSION} (see fellrec_jax/run/checkpoint.py). "
        "Start the run in a new --workdir, or resume it with the version that wrote it.")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
  return step, restored.state, meta


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
