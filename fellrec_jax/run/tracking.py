"""Experiment trackers: every round's figures (what metrics.jsonl holds) to TensorBoard and Weights & Biases.

`log.tensorboard=True` writes <workdir>/tensorboard (tensorboardX's writer; `tensorboard --logdir RUN`);
`log.wandb_project=NAME` logs to W&B (`log.wandb_mode`: "offline" writes <workdir>/wandb, which
`wandb sync` uploads later; "online" needs a login). Neither package is needed unless enabled; an enabled
tracker whose package is missing is an error when the run is set up. Only process 0 writes.

Per round (step = round index): the weighted losses and means (`loss/`), each client's `train_loss/`,
`val_loss/`, `lr/` and `warm_weight/` (for up to `log.client_scalars` clients; beyond that min/mean/max),
`comm/` bytes, `round/seconds`, `fellrec/similarity_offdiag_mean`, the mixing matrix as an image
(`aggregation`, brighter = more weight), and evaluation metrics (`eval/`) when a round or the run ends
with an evaluation (TensorBoard writes eval/hr@10 as eval/hr_10).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import re
import uuid
from pathlib import Path

import numpy as np

from fellrec_jax.run import distributed
from fellrec_jax.run import round_records

logger = logging.getLogger("fellrec_jax")

PACKAGES = {"tensorboard": "tensorboardX", "wandb_project": "wandb"}  # log field -> the package it needs
WANDB_MODES = ("offline", "online")
_TRACKERS: dict[Path, "Trackers"] = {}  # open trackers by workdir (one run per workdir)


class TrackingError(ValueError):
  """A tracker that is enabled but cannot be used, with the log field at fault."""


def settings(config) -> dict:
  """The run's `log` section with defaults for configs written before it existed."""
  log = config.get("log") or {}
  return {"tensorboard": bool(log.get("tensorboard", False)), "wandb_project": str(log.get("wandb_project", "") or ""),
          "wandb_mode": str(log.get("wandb_mode", "offline")), "client_scalars": int(log.get("client_scalars", 64))}


def check(config) -> None:
  """Raise TrackingError when an enabled tracker's package is not installed or a log field is invalid."""
  log = settings(config)
  for field, package in PACKAGES.items():
    if log[field] and importlib.util.find_spec(package) is None:
      raise TrackingError(f"log.{field}={log[field]!r} needs the {package} package, which is not installed: "
                          f"pip install {package}, or unset log.{field}")
  if log["wandb_mode"] not in WANDB_MODES:
    raise TrackingError(f"log.wandb_mode must be one of {WANDB_MODES}, got {log['wandb_mode']!r}")
  if log["client_scalars"] < 0:
    raise TrackingError(f"log.client_scalars must be >= 0, got {log['client_scalars']}")


# ----------------------------------------------------------------------------------------------------
# What is logged


def round_scalars(record: dict, client_scalars: int = 64, arrays: dict | None = None) -> dict[str, float]:
  """A metrics.jsonl round record as {tag: value}: weighted losses, per-client fields, comm, time. The
  training losses are over the clients that trained this round; a summarised record (no "clients") takes
  the per-client fields from its `arrays`."""
  clients = record["clients"] if "clients" in record else round_records.client_rows(arrays)
  train = np.array([np.nan if c["train_loss"] is None else c["train_loss"] for c in clients], np.float64)
  examples = np.array([c.get("train_examples", 1) for c in clients], np.float64)
  trained = np.isfinite(train)
  weights = examples[trained]
  out = {"loss/val_weighted": record["val_loss_weighted"],
         "loss/train_mean": float(train[trained].mean()) if trained.any() else None,
         "loss/train_weighted": float(train[trained] @ weights / weights.sum()) if weights.sum() else None}
  fields = ("train_loss", "val_loss", "lr", "warm_weight")
  if len(clients) <= client_scalars:
    out.update({f"{field}/client_{c['client']}": c[field] for c in clients for field in fields})
  else:
    for field in fields:
      values = np.array([np.nan if c[field] is None else c[field] for c in clients], np.float64)
      out.update({f"{field}/min": np.nanmin(values), f"{field}/mean": np.nanmean(values),
                  f"{field}/max": np.nanmax(values)})
  out["comm/bytes"] = record["comm_bytes"]
  out.update({f"comm/{name}": value for name, value in record.get("comm_detail", {}).items() if name != "total"})
  out["round/seconds"] = record["seconds"]
  if "label_tokens" in record:
    out["round/label_tokens"] = record["label_tokens"]
  if record.get("similarity_offdiag_mean") is not None:
    out["fellrec/similarity_offdiag_mean"] = record["similarity_offdiag_mean"]
  if record.get("eval"):
    out.update(eval_scalars(record["eval"]))
  return {tag: float(value) for tag, value in out.items() if value is not None and np.isfinite(float(value))}


def eval_scalars(report: dict) -> dict[str, float]:
  """eval.json's overall metrics (and the popularity baseline's, when present) as eval/ tags."""
  out = {f"eval/{name}": value for name, value in report.get("overall", report).items()
         if isinstance(value, (int, float))}
  popularity = report.get("baselines", {}).get("popularity", {}).get("overall", {})
  out.update({f"eval_popularity/{name}": value for name, value in popularity.items()})
  return {tag: float(value) for tag, value in out.items()}


def tensorboard_tag(tag: str) -> str:
  """The tag as TensorBoard allows it: characters other than letters, digits, _ . / - become _ (eval/hr_10)."""
  return re.sub(r"[^\w./-]", "_", tag)


def matrix_image(matrix, min_pixels: int = 256, max_pixels: int = 1024) -> np.ndarray:
  """uint8 [H, W, 3] of a [C, C] matrix with entries in [0, 1] (viridis; each entry a square of pixels; a
  matrix larger than max_pixels is shown by the means of square blocks of entries)."""
  from matplotlib import colormaps
  matrix = np.clip(np.nan_to_num(np.asarray(matrix, np.float64)), 0.0, 1.0)
  if matrix.shape[0] > max_pixels:
    block = -(-matrix.shape[0] // max_pixels)
    size = -(-matrix.shape[0] // block) * block
    padded = np.full((size, size), np.nan)
    padded[:matrix.shape[0], :matrix.shape[1]] = matrix
    matrix = np.nanmean(padded.reshape(size // block, block, size // block, block), axis=(1, 3))
  scale = max(1, min_pixels // max(1, matrix.shape[0]))
  rgb = (colormaps["viridis"](matrix)[..., :3] * 255).round().astype(np.uint8)
  return np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)


# ----------------------------------------------------------------------------------------------------
# The trackers of a run


class Trackers:
  """The enabled trackers of one run (process 0)."""

  def __init__(self, workdir: Path, config, first_round: int):
    log = settings(config)
    self.client_scalars = log["client_scalars"]
    self.tensorboard = None
    self.wandb = None
    if log["tensorboard"]:
      from tensorboardX import SummaryWriter
      # purge_step: rounds redone after a resume replace the ones logged before the interruption
      self.tensorboard = SummaryWriter(str(workdir / "tensorboard"), purge_step=first_round or None)
    if log["wandb_project"]:
      import wandb
      self.wandb = wandb.init(project=log["wandb_project"], dir=str(workdir), mode=log["wandb_mode"],
                              name=workdir.name, id=_wandb_id(workdir), resume="allow",
                              config=json.loads(config.to_json_best_effort()))

  def log(self, scalars: dict[str, float], step: int, matrix=None) -> None:
    if self.tensorboard is not None:
      for tag, value in scalars.items():
        self.tensorboard.add_scalar(tensorboard_tag(tag), value, step)
      if matrix is not None and len(matrix):
        self.tensorboard.add_image("aggregation", matrix_image(matrix), step, dataformats="HWC")
      self.tensorboard.flush()
    if self.wandb is not None:
      import wandb
      extra = {"aggregation": wandb.Image(matrix_image(matrix))} if matrix is not None and len(matrix) else {}
      self.wandb.log({**scalars, **extra}, step=step)

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()
      self.tensorboard = None
    if self.wandb is not None:
      self.wandb.finish()
      self.wandb = None


def _wandb_id(workdir: Path) -> str:
  """The run's W&B id, kept in the workdir so that a resumed run continues the same W&B run."""
  path = workdir / "wandb_run_id"
  if not path.is_file():
    path.write_text(uuid.uuid4().hex[:12])
  return path.read_text().strip()


def _trackers(run, first_round: int) -> Trackers | None:
  log = settings(run.config)
  if not distributed.is_main() or not (log["tensorboard"] or log["wandb_project"]):
    return None
  key = Path(run.workdir).resolve()
  if key not in _TRACKERS:
    _TRACKERS[key] = Trackers(key, run.config, first_round)
  return _TRACKERS[key]


def log_round(run, record: dict, arrays: dict | None = None) -> None:
  """A round's record (metrics.jsonl's line, and the full arrays of a summarised one) to the enabled trackers."""
  trackers = _trackers(run, record["round"])
  if trackers is not None:
    matrix = record.get("aggregation", None if arrays is None else arrays["aggregation"])
    trackers.log(round_scalars(record, trackers.client_scalars, arrays), record["round"], matrix)


def finish(run, summary: dict) -> None:
  """The run's end: its final evaluation (summary["eval"], when it ran) at step rounds_done; trackers closed."""
  key = Path(run.workdir).resolve()
  trackers = _trackers(run, summary["rounds_done"]) if summary.get("eval") else _TRACKERS.get(key)
  if trackers is None:
    return
  if summary.get("eval"):
    trackers.log(eval_scalars(summary["eval"]), summary["rounds_done"])
  trackers.close()
  _TRACKERS.pop(key, None)


@atexit.register
def _close_all() -> None:
  for trackers in list(_TRACKERS.values()):
    try:
      trackers.close()
    except Exception as error:  # at exit, a tracker that cannot close must not hide the run's own outcome
      logger.warning("closing a tracker at exit failed: %s", error)
  _TRACKERS.clear()

