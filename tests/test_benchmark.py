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
                         "--reps", "1", "--block", "1", "--data", str(DATA), "--out", str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| 8 |" in proc.stdout  # the table is printed
  return json.loads(out.read_text())


def test_quick_writes_the_figures(results):
  for side in ("jax", "torch"):
    assert results[side]["samples_per_s"] > 0 and results[side]["tokens_per_s"] > 0
    assert results[side]["peak_rss_mb"] > 0
    # --reps 1 --block 1 with the default --rewarm 1: one untimed round, then the timed one.
    assert len(results["cases"][0][side]["seconds"]) == len(results["cases"][0][side]["rewarm_seconds"]) == 1
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


def test_rounds_take_turns_in_blocks_with_untimed_rewarm_rounds():
  sys.path.insert(0, str(ROOT / "tools"))
  import benchmark
  schedule = benchmark.round_schedule(["jax", "torch"], reps=5, block=2, rewarm=1)
  for kind in ("jax", "torch"):
    assert sum(1 for k, timed in schedule if k == kind and timed) == 5
  # ABBA turns: jax, torch, (torch,) jax, (jax,) torch; each turn starts with its untimed round.
  turn_starts = [i for i, (kind, _) in enumerate(schedule) if i == 0 or schedule[i - 1][0] != kind]
  assert [schedule[i] for i in turn_starts] == [("jax", False), ("torch", False), ("jax", False), ("torch", False)]
  assert [t for k, t in schedule if k == "torch"] == [False, True, True, True, True, False, True]
  # The old protocol: single rounds alternating, none untimed.
  assert benchmark.round_schedule(["jax", "torch"], 2, 1, 0) == [
      ("jax", True), ("torch", True), ("torch", True), ("jax", True)]
  with pytest.raises(ValueError, match="--block"):
    benchmark.round_schedule(["jax"], 3, 0, 1)
