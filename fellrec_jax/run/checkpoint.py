"""Orbax checkpoints of a federated run: array state (client states, server state, best adapters) plus a
JSON part (round, config fingerprint, metrics so far, the state's layout version). Data order needs no
saving: round r's batches are a function of (seed, r).

Layout versions: 1 (no "layout" field) stored adapters as {projection: {"a", "b"}}; 2 stores the model's
NNX adapter state, {"layers": {block: {projection: {"lora_a", "lora_b"}}}}. A checkpoint of another layout
is refused with a message rather than converted: a run is cheap to restart next to it, and a converter
would have to follow every future change of the state.

Crashes: Orbax writes a step into a temporary directory and renames it when complete, so a save cut short
leaves no step (a resumed run removes its temporary directory: `remove_unfinished`). A step that is damaged
all the same (a truncated or corrupted file: a disk error, a copy cut short, a file system without atomic
renames) is skipped on resume with a warning: the run resumes from the newest readable step, and the
damaged ones are moved to `damaged_checkpoints/` next to `checkpoints/` (kept for inspection, and out of the
way of the rounds that are redone).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp

from fellrec_jax import files

logger = logging.getLogger("fellrec_jax")


LAYOUT_VERSION = 2
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step directory being written


class ResumeError(ValueError):
  """A workdir whose checkpoint cannot be resumed with this config."""


def manager(directory, max_to_keep: int = 2) -> ocp.CheckpointManager:
  """Synchronous saves, each array in its own zarr directory (not OCDBT: Orbax's OCDBT writer holds about
  half of the state in memory while it writes, 301 MiB for a 547 MiB state, against 28 MiB without it).
  Checkpoints written with OCDBT are read as well: restore follows the format on disk."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                         create=True)
  handlers = {"state": ocp.StandardCheckpointHandler(use_ocdbt=False), "meta": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(Path(directory).resolve(), options=options, item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  meta = {**meta, "layout": LAYOUT_VERSION}
  files.fault_point("checkpoint_before_save")
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()
  files.fault_point("checkpoint_after_save")


def restore(mngr: ocp.CheckpointManager, like: Any, step: int | None = None,
            check: Callable[[dict], None] | None = None, damaged: list | None = None
            ) -> tuple[int, Any, dict] | None:
  """(step, state shaped like `like`, meta) of the latest readable (or the given) checkpoint; None if none.

  `check(meta)` runs before the state is read (it raises to refuse a checkpoint, e.g. of another config).
  Without `step`, a damaged step (its meta or state unreadable) is skipped, with a warning, for the one
  before it, and appended to `damaged` when given. A given `step` that is damaged raises.
  """
  steps = [step] if step is not None else sorted(mngr.all_steps(), reverse=True)
  damaged = [] if damaged is None else damaged
  for s in steps:
    try:
      meta = read_meta(mngr, s)
    except Exception as error:  # noqa: BLE001 (any failure to read a file of the step is damage)
      skip_damaged(mngr, s, error, step is not None, damaged)
      continue
    if check is not None:
      check(meta)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      _check_structure(mngr, s, abstract)
      restored = mngr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except Exception as error:  # noqa: BLE001
      skip_damaged(mngr, s, error, step is not None, damaged)
      continue
    return s, restored.state, meta
  return None


def read_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  meta = dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
  layout = meta.get("layout", 1)
  if layout != LAYOUT_VERSION:
    raise ResumeError(
        f"{Path(mngr.directory) / str(step)}: checkpoint of state layout {layout}, written by another version "
        f"of fellrec_jax; this version reads layout {LAYOUT_VERSION} (see fellrec_jax/run/checkpoint.py). "
        "Start the run in a new --workdir, or resume it with the version that wrote it.")
  return meta


def _check_structure(mngr: ocp.CheckpointManager, step: int, abstract) -> None:
  """Raise ResumeError if the saved state's arrays (names, shapes) are not those of `abstract` (a change of
  the state without a new layout version); its metadata unreadable raises another error (damage)."""
  saved = ocp.StandardCheckpointer().metadata(Path(mngr.directory) / str(step) / "state").item_metadata
  theirs, ours = _shapes(saved), _shapes(abstract)
  unreadable = [k for k, shape in theirs.items() if shape is None]
  if not theirs or unreadable:
    raise OSError("the state's array metadata is unreadable")
  if theirs != ours:
    diffs = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    raise ResumeError(
        f"{Path(mngr.directory) / str(step)}: the checkpoint's state differs from this version's "
        f"(e.g. {', '.join(f'{k}: saved {theirs.get(k)}, expected {ours.get(k)}' for k in diffs[:3])}); start "
        "the run in a new --workdir, or resume it with the version that wrote it.")


def _shapes(tree) -> dict[str, tuple]:
  shape = lambda v: None if getattr(v, "shape", None) is None else tuple(v.shape)
  return {jax.tree_util.keystr(k): shape(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def skip_damaged(mngr: ocp.CheckpointManager, step: int, error: Exception, fatal: bool, damaged: list) -> None:
  """A step failed to read: re-raise a ResumeError (not damage); raise one for damage when `fatal`; else
  warn that the step is skipped for the one before it and append it to `damaged`."""
  if isinstance(error, ResumeError):
    raise error
  where = Path(mngr.directory) / str(step)
  reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
  if fatal:
    raise ResumeError(f"{where}: damaged checkpoint ({reason})") from error
  logger.warning("%s: damaged checkpoint, skipped for the one before it (%s)", where, reason)
  damaged.append(step)


def remove_unfinished(mngr: ocp.CheckpointManager) -> list[Path]:
  """Delete the temporary directories of saves a crash cut short (a resuming run does this; an evaluation
  of a run that is still training must not, so the manager itself leaves them)."""
  stale = sorted(Path(mngr.directory).glob(f"*{TMP_SUFFIX}*"))
  for path in stale:
    logger.warning("removing %s: a checkpoint save that did not finish", path)
    shutil.rmtree(path, ignore_errors=True)
  return stale


def set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> list[Path]:
  """Move damaged steps to <checkpoints>/../damaged_checkpoints/ (so those rounds can be saved again)."""
  root = Path(mngr.directory)
  moved = []
  for step in steps:
    target = root.parent / "damaged_checkpoints" / str(step)
    n = 1
    while target.exists():
      target, n = root.parent / "damaged_checkpoints" / f"{step}_{n}", n + 1
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(root / str(step)), str(target))
    logger.warning("moved the damaged checkpoint %s to %s", root / str(step), target)
    moved.append(target)
  return moved


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
