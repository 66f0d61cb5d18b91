"""tools/benchmark.py end to end at the tiny preset: the JSON the issue asks for, and both sides doing the
same work (the PyTorch baseline and our round train the same clients on the same steps from the same
weights, so their first-round per-client losses agree)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/games_bigrec"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "bench.json"
  proc = subprocess.run([sys.executable, str(ROOT / "tools/benchmark.py"), "--preset", "tiny", "--quick",
                         "--reps", "1", "--data", str(DATA), "--out", str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| 8 |" in proc.stdout  # the table is printed
  return json.loads(out.read_text())


def test_quick_writes_the_figures(results):
  for side in ("jax", "torch"):
    assert results[side]["samples_per_s"] > 0 and results[side]["tokens_per_s"] > 0
    assert results[side]["peak_rss_mb"] > 0
  assert results["speedup"] == pytest.approx(results["jax"]["samples_per_s"] / results["torch"]["samples_per_s"])
  (case,) = results["cases"]
  assert case["clients"] == 8 and case["samples"] == 8 * case["steps_per_client"] * 8


def test_both_sides_do_the_same_work(results):
  (case,) = results["cases"]
  jax_loss, torch_loss = np.asarray(case["jax"]["train_loss"]), np.asarray(case["torch"]["train_loss"])
  assert jax_loss.shape == torch_loss.shape == (8,)
  np.testing.assert_allclose(jax_loss, torch_loss, rtol=2e-5, atol=2e-5)
  # The same samples, but we execute fewer FLOPs per sample (the prefix once a client step, no padding).
  assert case["jax_executed_flops_per_sample"] < case["torch_executed_flops_per_sample"]
