"""Crash safety: a run killed at any point and run again ends as an uninterrupted run.

Each kill point stops the smoke run (fewer samples) at a named stage, then the same run is started again on
the same workdir; its metrics.jsonl, eval.json, summary.json and best adapters (the PEFT files) must equal
those of one uninterrupted run (timings aside), and no temporary file may be left.

The stages are fault points of the code (fellrec_jax/files.py: `fault_point`, armed by the environment
variable FELLREC_FAULT_AT=<stage>[#<n>]) plus one inside Orbax's save, after the step's files are written and
before the step directory is renamed into place.

By default the kills are simulated in this process (the fault point raises an exception that nothing
catches, instead of os._exit): this shares the compiled functions between runs and keeps the test fast.
Only DEFAULT_POINTS run. Set FELLREC_KILL_TEST=all to run every point of KILL_POINTS in a real process that
is stopped with os._exit (and the checkpoint point with kill -9, sent when Orbax's temporary step directory
appears): minutes per point on 2 CPU cores.

  FELLREC_KILL_TEST=all python -m pytest -q tests/test_crash_safety.py
"""

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fellrec_jax import files
from fellrec_jax.run import adapters as adapters_lib
from fellrec_jax.run import checkpoint
from fellrec_jax.run import train
from test_train import smoke

# Under pytest-xdist every test of this module runs on one worker (--dist loadgroup, pyproject.toml),
# so its module fixture (the uninterrupted reference run) is built once, not once per worker.
pytestmark = pytest.mark.xdist_group("crash_safety")

ROOT = Path(__file__).resolve().parents[1]
ALL = os.environ.get("FELLREC_KILL_TEST") == "all"
UNFINALIZED = "checkpoint_unfinalized"  # inside Orbax's save: files written, step not yet renamed

# name -> the FELLREC_FAULT_AT value (stage#n: the n-th time the stage is reached). Two rounds, a checkpoint
# after each, then the best adapters, summary.json, the evaluation (eval.json) and summary.json again.
KILL_POINTS = {
    "after round 0's metrics line": "metrics_line#1",
    "after round 1's metrics line": "metrics_line#2",
    "before the first checkpoint save": "checkpoint_before_save#1",
    "inside the first checkpoint save": f"{UNFINALIZED}#1",
    "inside the last checkpoint save": f"{UNFINALIZED}#2",
    "after the first checkpoint save": "checkpoint_after_save#1",
    "after the last checkpoint save": "checkpoint_after_save#2",
    "before config.json's rename": "before_rename:config.json",
    "after the best adapters": "adapters_written",
    "after the first summary.json": "summary_written",
    "before eval.json's rename": "before_rename:eval.json",
    "after eval.json": "eval_written",
}
DEFAULT_POINTS = ("after round 0's metrics line", "inside the first checkpoint save", "after eval.json")
SETTINGS = {"data.synthetic.num_users": 60, "data.synthetic.num_series": 12, "data.partition": "random",
            "data.max_train_samples": 24, "data.max_valid_samples": 9, "eval.max_test_users": 1}


class Killed(BaseException):
  """The simulated kill: a BaseException, which the run's `except Exception` clean-ups do not catch."""


def config(cache_dir):
  c = smoke(**SETTINGS, **{"pretrain.cache_dir": str(cache_dir)})
  c.eval.at_end = True  # eval.json is among the outputs compared
  return c


def outputs(workdir: Path) -> dict:
  """What a finished run leaves that must not depend on interruptions (timings removed)."""
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  for record in metrics:
    record.pop("seconds")
  evaluation = json.loads((workdir / "eval.json").read_text())
  evaluation["settings"].pop("seconds")
  adapters = {str(p.relative_to(workdir)): p.read_bytes() for p in sorted((workdir / "adapters").rglob("*"))
              if p.is_file()}
  return {"metrics": metrics, "eval": evaluation, "summary": json.loads((workdir / "summary.json").read_text()),
          "adapters": adapters}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(outputs of an uninterrupted run, its workdir, the shared base-model cache)."""
  root = tmp_path_factory.mktemp("reference")
  train.train(config(root / "base"), root / "run")
  return outputs(root / "run"), root / "run", root / "base"


def kill_in_process(monkeypatch, workdir, base, point):
  stage, _, nth = point.partition("#")
  monkeypatch.setattr(files, "_reached", collections.Counter())
  if stage == UNFINALIZED:
    calls = collections.Counter()
    finalize = ocp.CompositeCheckpointHandler.finalize

    def crash_before_rename(self, directory):
      calls["n"] += 1
      if calls["n"] == int(nth or 1):
        raise Killed(point)
      return finalize(self, directory)

    monkeypatch.setattr(ocp.CompositeCheckpointHandler, "finalize", crash_before_rename)
  else:
    monkeypatch.setenv(files.FAULT_ENV, point)
    monkeypatch.setattr(files, "crash", lambda stage: (_ for _ in ()).throw(Killed(stage)))
  with pytest.raises(Killed):
    train.train(config(base), workdir)
  monkeypatch.undo()


def train_command(workdir, base):
  flags = [f"--config.{k}={v}" for k, v in {**SETTINGS, "pretrain.cache_dir": base}.items()]
  return [sys.executable, str(ROOT / "experiments/train.py"), "--config=configs/default.py:smoke",
          f"--workdir={workdir}", *flags]


def kill_process(workdir, base, point):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  stage, _, nth = point.partition("#")
  if stage != UNFINALIZED:
    result = subprocess.run(train_command(workdir, base), cwd=ROOT, env={**env, files.FAULT_ENV: point},
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == files.FAULT_EXIT_CODE, result.stderr[-3000:]
    return
  pattern = f"{nth or 1}.orbax-checkpoint-tmp*"  # Orbax's temporary directory of the step being saved
  process = subprocess.Popen(train_command(workdir, base), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  while process.poll() is None and not list((workdir / "checkpoints").glob(pattern)):
    time.sleep(0.001)
  assert process.poll() is None, f"the run ended before {workdir / 'checkpoints' / pattern} appeared"
  os.kill(process.pid, signal.SIGKILL)
  process.wait()


@pytest.mark.parametrize("name", [n for n in KILL_POINTS if ALL or n in DEFAULT_POINTS])
def test_a_run_killed_and_rerun_ends_as_an_uninterrupted_run(tmp_path, monkeypatch, reference, name):
  expected, _, base = reference
  workdir = tmp_path / "run"
  if ALL:
    kill_process(workdir, base, KILL_POINTS[name])
    subprocess.run(train_command(workdir, base), cwd=ROOT, check=True, capture_output=True)
  else:
    kill_in_process(monkeypatch, workdir, base, KILL_POINTS[name])
    train.train(config(base), workdir)
  assert outputs(workdir) == expected
  assert not list(workdir.rglob(f".*{files.TEMP_MARK}*"))  # nor temporaries of atomic writes
  assert not list((workdir / "checkpoints").glob(f"*{checkpoint.TMP_SUFFIX}*"))  # nor unfinished saves


def test_a_damaged_checkpoint_and_a_torn_metrics_line_are_repaired_on_resume(tmp_path, reference, caplog):
  expected, finished, base = reference
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  for name in ("eval.json", "summary.json"):
    (workdir / name).unlink()
  shutil.rmtree(workdir / "adapters")
  meta = workdir / "checkpoints/2/meta/metadata"
  meta.write_text(meta.read_text()[:40])  # truncated, as by a copy cut short
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"round": 2, "clients": [{"cli')  # a line torn by a crash
  train.train(config(base), workdir)
  assert "checkpoints/2: damaged checkpoint, skipped for the one before it (JSONDecodeError" in caplog.text
  assert "metrics.jsonl: line 3 is incomplete" in caplog.text
  assert outputs(workdir) == expected  # round 1 redone from the checkpoint after round 0
  assert (workdir / "damaged_checkpoints/2/meta/metadata").exists()


def array_files(state_dir):
  """The files holding a saved state's array values: each array's chunks ("0.0", ...) in its own directory."""
  files = [p for p in state_dir.rglob("*") if p.is_file() and re.fullmatch(r"\d+(\.\d+)*", p.name)]
  assert files, f"no array files in {state_dir}"
  return files


def test_a_damaged_state_file_is_skipped_and_a_damaged_given_step_is_an_error(tmp_path, reference):
  _, finished, _ = reference
  directory = tmp_path / "checkpoints"
  shutil.copytree(finished / "checkpoints", directory)
  for data in array_files(directory / "2/state"):
    data.write_bytes(data.read_bytes()[:7])
  mngr = checkpoint.manager(directory)
  like = ocp.StandardCheckpointer().metadata(directory / "1/state").item_metadata
  like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), like)
  damaged = []
  step, _, _ = checkpoint.restore(mngr, like, damaged=damaged)
  assert (step, damaged) == (1, [2])
  with pytest.raises(checkpoint.ResumeError, match=r"checkpoints/2: damaged checkpoint"):
    checkpoint.restore(mngr, like, step=2)


def test_export_reads_the_checkpoint_before_a_damaged_latest_one(tmp_path, reference, caplog):
  """tools/export_adapters.py's reader: a damaged latest checkpoint is skipped for the previous one (nothing
  moved); a damaged step asked for by number is an error."""
  _, finished, _ = reference
  workdir = tmp_path / "run"
  shutil.copytree(finished / "checkpoints", workdir / "checkpoints")
  step, good = adapters_lib.read_checkpoint_adapters(workdir, "last", step=1)
  for data in array_files(workdir / "checkpoints/2/state"):
    data.write_bytes(data.read_bytes()[:7])
  got_step, got = adapters_lib.read_checkpoint_adapters(workdir, "last")
  assert (step, got_step) == (1, 1) and "checkpoints/2: damaged checkpoint, skipped" in caplog.text
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(good)):
    np.testing.assert_array_equal(a, b)
  assert (workdir / "checkpoints/2").exists()  # a reader moves nothing
  with pytest.raises(checkpoint.ResumeError, match=r"checkpoints/2: damaged checkpoint"):
    adapters_lib.read_checkpoint_adapters(workdir, "last", step=2)


def test_checkpoints_are_arrays_in_their_own_files_and_ocdbt_ones_still_restore(tmp_path):
  """Saves write each array in its own zarr directory (no OCDBT: its writer held half the state in memory);
  a checkpoint written with OCDBT, as earlier versions wrote them, restores to the same values."""
  state = {"adapters": np.arange(24, dtype=np.float32).reshape(3, 8), "server": {"round": np.array(2, np.int32)}}
  old = ocp.CheckpointManager(tmp_path / "old", options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=False, create=True))
  old.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave({"round": 2, "layout": checkpoint.LAYOUT_VERSION})))
  old.wait_until_finished()
  assert (tmp_path / "old/2/state/manifest.ocdbt").exists()
  checkpoint.save(checkpoint.manager(tmp_path / "new"), 2, state, {"round": 2})
  assert not list((tmp_path / "new").rglob("*ocdbt*")) and (tmp_path / "new/2/state/adapters").is_dir()
  for directory in ("old", "new"):
    step, got, meta = checkpoint.restore(checkpoint.manager(tmp_path / directory), state)
    assert (step, meta["round"]) == (2, 2)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
      np.testing.assert_array_equal(a, b)


def test_a_torn_metrics_line_is_removed_and_a_torn_middle_line_is_an_error(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"round": 0, "x": 1}\n{"round": 1, "x": 2}\n{"round": 2, "x"')
  assert files.filter_jsonl(path, lambda r: r["round"] < 5) == 2
  assert path.read_text() == '{"round": 0, "x": 1}\n{"round": 1, "x": 2}\n'
  assert "line 3 is incomplete" in caplog.text
  path.write_text('{"round": 0}\n{"rou\n{"round": 1}\n')
  with pytest.raises(files.TornFileError, match=r"metrics.jsonl: line 2 is not valid JSON"):
    files.filter_jsonl(path, lambda r: True)


def test_an_atomic_write_that_fails_leaves_the_old_file(tmp_path):
  path = tmp_path / "eval.json"
  files.write_json(path, {"a": 1})
  with pytest.raises(TypeError):
    files.write_json(path, {"a": object()})
  assert json.loads(path.read_text()) == {"a": 1} and os.listdir(tmp_path) == ["eval.json"]
