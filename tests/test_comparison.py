"""Comparisons over seeds: the summary's statistics on hand-made reports, resuming without rerunning."""

import json

import numpy as np
import pytest

from configs import default
from fellrec_jax.run import comparison

METRICS = ("recall@10",)


def report(overall, std, low, high):
  names = comparison.TABLE_METRICS
  popularity = {"overall": {m: 0.01 for m in names}, "balance": {m: {"std": 0, "min": 0, "max": 0} for m in names},
                "clients": [{"client": 0, "num_test_users": 1, **{m: 0.01 for m in names}}]}
  return {"overall": {m: overall for m in names}, "balance": {m: {"std": std, "min": low, "max": high} for m in names},
          "clients": [{"client": 0, "num_test_users": 1, **{m: overall for m in names}}],
          "baselines": {"popularity": popularity}}


def test_seed_summary_means_intervals_and_paired_differences():
  reports = {0: {"fellrec": report(0.10, 0.02, 0.05, 0.2), "fedavg": report(0.12, 0.04, 0.01, 0.3)},
             1: {"fellrec": report(0.20, 0.04, 0.15, 0.3), "fedavg": report(0.15, 0.06, 0.02, 0.4)},
             2: {"fellrec": report(0.30, 0.06, 0.25, 0.4), "fedavg": report(0.27, 0.08, 0.03, 0.5)}}
  s = comparison.seed_summary(reports, METRICS, baseline="fedavg")
  r = s["fellrec"]["recall@10"]
  # mean 0.2, sample std 0.1, t(0.975, 2 df) = 4.303: half width 4.303 * 0.1 / sqrt(3) = 0.248434
  assert r["mean"] == pytest.approx(0.2) and r["n"] == 3
  assert r["lo"] == pytest.approx(0.2 - 0.248434, abs=1e-6) and r["hi"] == pytest.approx(0.2 + 0.248434, abs=1e-6)
  assert r["balance"]["std"]["mean"] == pytest.approx(0.04)
  assert r["balance"]["min"]["mean"] == pytest.approx(0.15)
  # paired differences from FedAvg: -0.02, 0.05, 0.03 -> mean 0.02, std 0.036056, half 4.303 * 0.036056 / sqrt 3
  d = r["vs_fedavg"]
  assert d["mean"] == pytest.approx(0.02) and d["higher"] == 2 and d["n"] == 3
  assert d["hi"] - d["mean"] == pytest.approx(4.303 * np.std([-0.02, 0.05, 0.03], ddof=1) / np.sqrt(3))
  assert "vs_fedavg" not in s["fedavg"]["recall@10"]
  assert s["fedavg"]["worst_client_recall@10"]["mean"] == pytest.approx(0.02)
  table = comparison.summary_table(s, METRICS)
  assert "0.2000 [-0.0484, 0.4484]" in table and "(2/3)" in table


def test_one_seed_has_no_interval_and_many_seeds_use_the_normal_quantile():
  assert comparison.interval([0.5]) == {"mean": 0.5, "lo": None, "hi": None, "n": 1}
  values = np.linspace(0, 1, 40)
  i = comparison.interval(values)
  assert i["hi"] - i["mean"] == pytest.approx(1.96 * np.std(values, ddof=1) / np.sqrt(40))


def test_compare_over_seeds_writes_the_summary_and_resumes_without_rerunning(tmp_path, monkeypatch):
  trained = []

  def fake_train(config, workdir):  # a run's outputs, its numbers depending on seed and aggregator
    trained.append((config.seed, config.fed.aggregator))
    workdir.mkdir(parents=True, exist_ok=True)
    value = 0.1 * (config.seed + 1) + (0.05 if config.fed.aggregator == "fellrec" else 0.0)
    (workdir / "eval.json").write_text(json.dumps(report(value, 0.01, value / 2, value * 2)))
    rounds = [{"round": r, "val_loss_weighted": 1.0 / (r + 1) + value, "aggregation": [[0.6, 0.4], [0.3, 0.7]],
               "clients": [{"client": c, "warm_weight": 0.5} for c in range(2)]} for r in range(3)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))

  monkeypatch.setattr(comparison.train, "train", fake_train)
  config = default.get_config("smoke")
  comparison.compare(config, tmp_path, ["fellrec", "fedavg"], seeds=[0, 1, 2])
  assert sorted(trained) == sorted((s, a) for s in range(3) for a in ("fellrec", "fedavg"))
  summary = json.loads((tmp_path / "compare.json").read_text())
  assert summary["fellrec"]["recall@10"]["vs_fedavg"]["mean"] == pytest.approx(0.05)
  for name in ("compare.md", "compare.png", "compare_val_loss.png", "compare_fellrec_mixing.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  trained.clear()
  comparison.compare(config, tmp_path, ["fellrec", "fedavg"], seeds=[0, 1, 2])  # every run is done
  assert trained == []
