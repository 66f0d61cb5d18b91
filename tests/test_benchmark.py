"""tools/benchmark.py end to end at the tiny preset: the JSON it writes, and both sides doing the same work
(the PyTorch baseline and our round train the same clients on the same steps from the same weights, so
without dropout their first-round per-client losses agree); --quick measures LoRA dropout 0 and 0.05."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Under pytest-xdist every test of this module runs on one worker (--dist loadgroup, pyproject.toml),
# so its module fixture (the benchmark's quick run) is built once, not once per worker.
pytestmark = pytest.mark.xdist_group("benchmark")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/games_bigrec"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "bench.json"
  proc = subprocess.run([sys.executable, str(ROOT / "tools/benchmark.py"), "--preset", "tiny", "--quick",
                         "--reps", "1", "--block", "1", "--rewarm", "0", "--steps", "8:3", "--data", str(DATA),
                         "--out", str(out)],
                        cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "| 8 |" in proc.stdout  # the table is printed
  return json.loads(out.read_text())


def test_quick_writes_the_figures(results):
  for side in ("jax", "torch"):
    assert results[side]["samples_per_s"] > 0 and results[side]["tokens_per_s"] > 0
    assert results[side]["peak_rss_mb"] > 0
    # --reps 1 --block 1 --rewarm 0: one timed round, no untimed one (the schedule: the test below).
    assert len(results["cases"][0][side]["seconds"]) == 1 and results["cases"][0][side]["rewarm_seconds"] == []
  assert results["speedup"] == pytest.approx(results["jax"]["samples_per_s"] / results["torch"]["samples_per_s"])
  none, dropout = results["cases"]
  assert (none["lora_dropout"], dropout["lora_dropout"]) == (0.0, 0.05)  # the default is the reference's
  assert results["jax"]["samples_per_s"] == dropout["jax"]["samples_per_s"]  # the headline is with dropout
  assert results["jax_dropout_vs_none"] == pytest.approx(dropout["jax"]["samples_per_s"] /
                                                         none["jax"]["samples_per_s"])
  for case in results["cases"]:
    assert case["clients"] == 8 and case["steps_per_client"] == 3  # --steps 8:3
    assert case["samples"] == 8 * case["steps_per_client"] * 8


def test_both_sides_do_the_same_work(results):
  none, dropout = results["cases"]
  jax_loss, torch_loss = np.asarray(none["jax"]["train_loss"]), np.asarray(none["torch"]["train_loss"])
  assert jax_loss.shape == torch_loss.shape == (8,)
  np.testing.assert_allclose(jax_loss, torch_loss, rtol=2e-5, atol=2e-5)
  # With dropout each side draws its own masks: the losses move apart by the masks' effect on a round of
  # adapters that start at lora_b = 0, far less than a percent, but they do move.
  jax_loss, torch_loss = np.asarray(dropout["jax"]["train_loss"]), np.asarray(dropout["torch"]["train_loss"])
  np.testing.assert_allclose(jax_loss, torch_loss, rtol=1e-2)
  assert not np.allclose(jax_loss, none["jax"]["train_loss"], rtol=1e-7, atol=0)
  # The same samples, but we execute fewer FLOPs per sample (the prefix once a client step, no padding).
  assert none["jax_executed_flops_per_sample"] < none["torch_executed_flops_per_sample"]


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


def test_preset_default_mirrors_the_default_config():
  """--preset default takes configs/default.py's model, LoRA, batch size and clients_per_chunk; a value on
  the command line wins; a dropout outside [0, 1) is refused."""
  sys.path.insert(0, str(ROOT / "tools"))
  import benchmark
  from configs import default
  config = default.get_config()
  args = benchmark.parse_args(["--preset", "default", "--quick"])
  model = benchmark.PRESETS["default"]
  for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
    assert model[name] == config.model[name]
  assert model["split_k"] == config.fed.split_k and args.tokenizer_vocab == config.data.vocab_size
  assert (args.lora_rank, args.lora_alpha, tuple(args.lora_targets)) == (config.lora.rank, config.lora.alpha,
                                                                          tuple(config.lora.targets))
  assert (args.batch_size, args.lanes, args.stream_groups, args.stream_sizes) == (
      config.data.batch_size, config.fed.clients_per_chunk, config.fed.stream_groups, config.fed.stream_sizes)
  assert (args.quick_clients, args.lora_dropout, args.group_by_length) == (config.fed.num_clients, 0.05, True)
  cpu = benchmark.parse_args(["--batch_size", "4", "--lora_dropout", "0"])
  assert (cpu.batch_size, cpu.lanes, cpu.lora_rank, cpu.lora_dropout, cpu.group_by_length) == (4, 16, 8, 0.0, False)
  with pytest.raises(SystemExit):
    benchmark.parse_args(["--lora_dropout", "1"])


def test_length_grouped_batches_as_the_hf_trainer():
  """group_by_length: the same examples, seeded; batches of a megabatch sorted longest first, the longest
  example in the first batch."""
  sys.path.insert(0, str(ROOT / "tools"))
  import benchmark
  rs = np.random.RandomState(0)
  indices = list(range(100, 300))
  lengths = {i: int(rs.randint(5, 90)) for i in indices}
  batches = benchmark.length_grouped(indices, lengths, 4, seed=3)
  flat = [i for b in batches for i in b]
  assert sorted(flat) == indices and all(len(b) == 4 for b in batches)
  assert batches == benchmark.length_grouped(indices, lengths, 4, seed=3) != benchmark.length_grouped(
      indices, lengths, 4, seed=4)
  assert lengths[batches[0][0]] == max(lengths.values())
  mega = 4 * min(200 // 16, 50)  # 12 batches per megabatch
  for start in range(0, 200, mega):
    group = [lengths[i] for i in flat[start:start + mega]][1:]  # after the (possibly swapped) first
    assert group == sorted(group, reverse=True)
