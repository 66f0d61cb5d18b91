"""Plots write non-empty PNGs from eval.json reports and metrics.jsonl records."""

import json

import pytest

from fellrec_jax.evaluation import metrics
from fellrec_jax.evaluation import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def report(scale):
  per_client = [{"recall@10": scale * v, "ndcg@10": scale * v / 2} for v in (0.1, 0.3, 0.2)]
  return metrics.client_report(per_client, [5, 10, 20])


def assert_png(path):
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC and len(data) > 5000  # a real image, not an empty canvas


def test_client_bars(tmp_path):
  assert_png(plots.plot_client_bars({"fellrec": report(1.0), "fedavg": report(0.8)}, tmp_path / "a" / "bars.png"))
  assert_png(plots.plot_client_bars({"fellrec": report(1.0)}, tmp_path / "one.png", metrics=["recall@10"]))
  with pytest.raises(ValueError):
    plots.plot_client_bars({}, tmp_path / "none.png")


def test_round_curves_from_metrics_jsonl(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with open(path, "w") as f:
    for t in range(4):
      record = {"round": t, "clients": [{"client": c, "train_loss": 2.0 / (t + 1 + c), "val_loss": 2.1 / (t + 1),
                                         "lr": 1e-4, "warm_weight": 0.5 + 0.1 * t} for c in range(3)],
                "aggregation": [[1.0, 0.2, 0.1]] * 3, "comm_bytes": 1000 * (t + 1), "seconds": 3.5}
      if t % 2:
        record["eval"] = report(0.5 + 0.1 * t)  # train.py may evaluate every N rounds
      f.write(json.dumps(record) + "\n")
  rounds = plots.read_jsonl(path)
  assert len(rounds) == 4
  assert_png(plots.plot_round_curves(rounds, tmp_path / "curves.png"))
  assert_png(plots.plot_round_curves([{k: r[k] for k in ("round", "clients")} for r in rounds],
                                     tmp_path / "losses.png"))
  with pytest.raises(ValueError, match="no plottable"):
    plots.plot_round_curves([{"round": 0}], tmp_path / "empty.png")
