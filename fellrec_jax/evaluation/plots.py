"""PNG plots of evaluation reports (eval.json) and training curves (metrics.jsonl).

Figures are built with matplotlib's object API and saved through the Agg canvas: no pyplot global
state, no display needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

CLIENT_CURVES = ("train_loss", "val_loss", "warm_weight")  # per-client fields of a metrics.jsonl round
MAX_CLIENT_LINES = 12  # more clients: their min/mean/max per round instead of one line each
MAX_CLIENT_BARS = 30  # more clients: quantiles over the clients instead of one bar group each
QUANTILES = {"min": 0.0, "p25": 0.25, "median": 0.5, "p75": 0.75, "max": 1.0}
ROUND_CURVES = ("comm_bytes", "seconds")  # per-round scalars of a metrics.jsonl round


def read_jsonl(path) -> list[dict]:
  """The JSON objects of a .jsonl file, one per non-empty line."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_client_bars(reports: Mapping[str, Mapping], path, metrics: Sequence[str] = ("recall@10", "ndcg@10"),
                     title: str | None = None) -> Path:
  """Bars of each metric per client, one bar per method, plus the weighted overall ("all").

  reports: {method name: eval.json report}; the methods' clients are matched by client id.
  """
  if not reports:
    raise ValueError("no report to plot")
  clients = sorted({c["client"] for report in reports.values() for c in report["clients"]})
  many = len(clients) > MAX_CLIENT_BARS  # then quantiles over the clients, not one group per client
  groups = (list(QUANTILES) if many else [str(c) for c in clients]) + ["all"]
  fig = Figure(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(reports)) ** 0.5 + 2), 3.2 * len(metrics)))
  width = 0.8 / len(reports)
  for row, metric in enumerate(metrics):
    ax = fig.add_subplot(len(metrics), 1, row + 1)
    for m, (method, report) in enumerate(reports.items()):
      by_client = {c["client"]: c[metric] for c in report["clients"]}
      values = [by_client.get(c, np.nan) for c in clients]
      if many:
        values = [float(np.nanquantile(np.asarray(values, np.float64), q)) for q in QUANTILES.values()]
      values = values + [report["overall"][metric]]
      ax.bar(np.arange(len(groups)) + (m - (len(reports) - 1) / 2) * width, values, width, label=method)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel(metric)
    ax.grid(axis="y", alpha=0.3)
    if row == len(metrics) - 1:
      ax.set_xlabel(f"quantile over {len(clients)} clients" if many else "client")
    if len(reports) > 1 and row == 0:
      ax.legend(fontsize="small")
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def plot_round_curves(rounds: Sequence[Mapping], path, client_curves: Sequence[str] = CLIENT_CURVES,
                      round_curves: Sequence[str] = ROUND_CURVES, eval_metric: str = "recall@10") -> Path:
  """Per-round curves from metrics.jsonl records: one panel per field, one line per client.

  A record is {"round", "clients": [{"client", <client_curves>...}], <round_curves>...}; fields absent
  from every record are skipped. With more than MAX_CLIENT_LINES clients, or records that summarise their
  clients ("clients_summary"), a panel shows the min/mean/max over the clients instead. A record may also
  carry "eval" (an eval.json report of that round): its `eval_metric` is drawn per client and overall.
  """
  rounds = sorted(rounds, key=lambda r: r["round"])
  panels = [("client", f) for f in client_curves
            if any(f in c for r in rounds for c in r.get("clients", [])) or
            any((r.get("clients_summary") or {}).get(f) for r in rounds)]
  panels += [("round", f) for f in round_curves if any(f in r for r in rounds)]
  if any("eval" in r for r in rounds):
    panels.append(("eval", eval_metric))
  if not panels:
    raise ValueError(f"no plottable field in {len(rounds)} metrics records")
  cols = min(2, len(panels))
  nrows = -(-len(panels) // cols)
  fig = Figure(figsize=(5.5 * cols, 3.2 * nrows))
  for index, (kind, field) in enumerate(panels):
    ax = fig.add_subplot(nrows, cols, index + 1)
    for label, xs, ys in _series(rounds, kind, field):
      ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label,
              linewidth=2.5 if label == "overall" else 1.2)
    ax.set_title(field)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if kind != "round":
      ax.legend(fontsize="x-small", ncol=2)
  return _save(fig, path)


def plot_validation_curves(curves: Mapping[str, Sequence[Sequence[float]]], path) -> Path:
  """Weighted validation loss per round of several methods, over seeds: each seed's curve thin, the mean
  over seeds thick (curves: {method: [per-seed list of per-round losses]})."""
  fig = Figure(figsize=(6.5, 4))
  ax = fig.add_subplot(1, 1, 1)
  for index, (method, runs) in enumerate(curves.items()):
    color = f"C{index % 10}"
    for run in runs:
      ax.plot(range(len(run)), run, color=color, alpha=0.3, linewidth=0.8)
    length = min(len(run) for run in runs)
    mean = np.mean([run[:length] for run in runs], axis=0)
    ax.plot(range(length), mean, color=color, linewidth=2.2, label=f"{method} ({len(runs)} seeds)")
  ax.set_xlabel("round")
  ax.set_ylabel("weighted validation loss")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  ax.legend(fontsize="small")
  return _save(fig, path)


def plot_mixing_strip(rounds: Sequence[Mapping], path, max_rounds: int = 12) -> Path:
  """FELLRec's mixing matrices of the first rounds as a strip of heat maps, with each client's warm weight
  under its row (records of metrics.jsonl)."""
  if not rounds:
    raise ValueError("no metrics records to draw")
  drawn = sorted((r for r in rounds if "aggregation" in r), key=lambda r: r["round"])[:max_rounds]
  if not drawn:  # every matrix was summarised (log.metrics_clients): say where the full ones are
    fig = Figure(figsize=(5.0, 1.2))
    fig.text(0.5, 0.5, "mixing matrices summarised in metrics.jsonl;\nfull ones in rounds/round_<r>.npz",
             ha="center", va="center")
    return _save(fig, path)
  rounds = drawn
  fig = Figure(figsize=(2.2 * len(rounds) + 0.8, 2.6))
  for index, record in enumerate(rounds):
    ax = fig.add_subplot(1, len(rounds), index + 1)
    image = ax.imshow(np.asarray(record["aggregation"]), vmin=0.0, vmax=1.0, cmap="viridis")
    ids = record.get("participants", [c["client"] for c in record.get("clients", [])])
    by_id = {c["client"]: c["warm_weight"] for c in record.get("clients", [])}
    warm = ", ".join(f"{by_id[c]:.2f}" for c in ids if c in by_id) if 0 < len(ids) <= 6 else ""
    ax.set_title(f"round {record['round']}", fontsize="small")
    ax.set_xlabel(f"w: {warm}" if warm else "source client", fontsize="x-small")
    ax.set_xticks([])
    ax.set_yticks([])
  fig.colorbar(image, ax=fig.axes, fraction=0.02)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  return path


def _series(rounds, kind: str, field: str):
  """(label, rounds, values) lines of one panel."""
  if kind == "round":
    points = [(r["round"], r[field]) for r in rounds if field in r]
    return [(field, *zip(*points))]
  if kind == "client" and _many_clients(rounds):
    return _client_spread(rounds, field)
  per_client: dict[int, list[tuple[int, float]]] = {}
  overall = []
  for r in rounds:
    entries = r.get("clients", []) if kind == "client" else r.get("eval", {}).get("clients", [])
    for c in entries:
      if c.get(field) is not None:
        per_client.setdefault(c["client"], []).append((r["round"], c[field]))
    if kind == "eval" and "eval" in r:
      overall.append((r["round"], r["eval"]["overall"][field]))
  lines = [(f"client {c}", *zip(*points)) for c, points in sorted(per_client.items())]
  return lines + ([("overall", *zip(*overall))] if overall else [])


def _many_clients(rounds) -> bool:
  return any("clients_summary" in r or len(r.get("clients", [])) > MAX_CLIENT_LINES for r in rounds)


def _client_spread(rounds, field: str):
  """(label, rounds, values) lines of the min, mean and max of a per-client field over the clients."""
  lines = []
  for stat in ("min", "mean", "max"):
    points = []
    for r in rounds:
      if "clients_summary" in r:
        value = (r["clients_summary"].get(field) or {}).get(stat)
      else:
        values = np.asarray([np.nan if c.get(field) is None else c[field] for c in r.get("clients", [])],
                            np.float64)
        finite = values[np.isfinite(values)]
        value = float(getattr(np, stat)(finite)) if len(finite) else None
      if value is not None:
        points.append((r["round"], value))
    if points:
      lines.append((f"{stat} over clients", *zip(*points)))
  return lines


def _save(fig: Figure, path) -> Path:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path
