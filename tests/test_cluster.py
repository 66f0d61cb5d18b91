"""Multi-process runs on this machine: 2 processes x 2 CPU devices (gloo collectives, coordinator on the
loopback) give one process's numbers and files, survive kill -9 and SIGTERM, and fail fast and clearly."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fellrec_jax.run import distributed

# Under pytest-xdist every test of this module runs on one worker (--dist loadgroup, pyproject.toml),
# so its module fixture (the two-process run) is built once, not once per worker.
pytestmark = pytest.mark.xdist_group("cluster")

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "tools" / "launch" / "local.sh"
# The smoke config with 4 clients (one per device), ROUNDS rounds, a short evaluation.
ROUNDS = 2
ARGS = ["--config=configs/default.py:smoke", "--config.fed.num_clients=4", "--config.eval.max_test_users=2"]
MESH = ["--config.mesh.clients=4"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
TIMEOUT = 600
OUTPUTS = {"metrics.jsonl", "summary.json", "eval.json", "predictions.jsonl", "config.json", "train.log",
           "eval_clients.png", "rounds.png"}


def launch(n, workdir, *extra, env=ENV, rounds=ROUNDS):
  """tools/launch/local.sh n ... as a running process (its stdout names each process's pid)."""
  return subprocess.Popen(["bash", str(LAUNCH), str(n), *ARGS, f"--config.fed.rounds={rounds}", *MESH,
                           f"--workdir={workdir}", *extra], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc):
  out, _ = proc.communicate(timeout=TIMEOUT)
  return proc.returncode, out


def single(workdir, devices, *extra):
  env = {**ENV, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  mesh = MESH if devices > 1 else []
  run = subprocess.run([sys.executable, "experiments/train.py", *ARGS, f"--config.fed.rounds={ROUNDS}", *mesh,
                        f"--workdir={workdir}", *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
  assert run.returncode == 0, run.stderr[-3000:]


def metrics(workdir):
  return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, proc, what, limit=TIMEOUT):
  start = time.time()
  while not predicate():
    assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[0][-3000:]}"
    assert time.time() - start < limit, f"no {what} after {limit} s"
    time.sleep(0.5)


def pids(proc, n):
  """The pids local.sh prints as it starts each process."""
  found = {}
  while len(found) < n:
    line = proc.stdout.readline()
    if line.startswith("process ") and ": pid " in line:
      found[int(line.split()[1].rstrip(":"))] = int(line.split()[-1])
  return found


def rounds_checkpointed(workdir):
  steps = [int(p.name) for p in (Path(workdir) / "checkpoints").glob("*") if p.name.isdigit()]
  return max(steps, default=0)


def assert_same_run(a, b, rtol=1e-5, evaluation=True):
  ra, rb = metrics(a), metrics(b)
  assert [r["round"] for r in ra] == [r["round"] for r in rb] == list(range(len(ra)))
  for x, y in zip(ra, rb):
    np.testing.assert_allclose(x["val_loss_weighted"], y["val_loss_weighted"], rtol=rtol)
    np.testing.assert_allclose([c["train_loss"] for c in x["clients"]], [c["train_loss"] for c in y["clients"]],
                               rtol=rtol)
    # The mixing weights are softmax(cosine / 0.05): reduction-order round-off in the cosines moves them
    # by ~1e-5 (as in the single-process mesh test).
    np.testing.assert_allclose(x["aggregation"], y["aggregation"], rtol=0, atol=1e-4)
  if not evaluation:
    return
  ea, eb = (json.loads((Path(w) / "eval.json").read_text()) for w in (a, b))
  for key in ea["overall"]:
    np.testing.assert_allclose(ea["overall"][key], eb["overall"][key], rtol=1e-6, err_msg=key)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cluster") / "two"
  code, out = finish(launch(2, workdir))
  assert code == 0, out[-5000:]
  return workdir, out


@pytest.mark.slow
def test_two_processes_equal_one_device(two_process_run, tmp_path):
  """(One process on a 3-device client mesh against one device: tests/test_train.py.)"""
  workdir, out = two_process_run
  single(tmp_path / "one_device", 1)
  assert_same_run(workdir, tmp_path / "one_device")
  # Exactly one copy of every output: one line per round, one log written by process 0, no leftovers.
  files = {p.name for p in workdir.iterdir() if p.is_file()}
  assert OUTPUTS <= files and not any(name.startswith(("process_", "eval_parts")) for name in files), files
  assert not (workdir / "eval_parts").exists()
  assert sorted(p.name for p in (workdir / "adapters").iterdir()) == [f"client_{c}" for c in range(4)]
  log = (workdir / "train.log").read_text()
  assert "[process 0/2]" in log and "[process 1/2]" not in log
  assert sum(" round 0: weighted val loss" in line for line in log.splitlines()) == 1
  assert "[process 0/2] streamed steps run at" in log  # sizes planned over all rounds: one program for every round
  assert "[process 1/2] round 1: weighted val loss" in out  # each process says who speaks on its console


@pytest.mark.slow
def test_killed_process_relaunched_ends_where_an_uninterrupted_run_ends(two_process_run, tmp_path):
  reference, _ = two_process_run
  workdir = tmp_path / "killed"
  proc = launch(2, workdir)
  ids = pids(proc, 2)
  wait_for(lambda: rounds_checkpointed(workdir) >= 1, proc, "checkpoint of round 0")
  os.kill(ids[1], signal.SIGKILL)
  code, out = finish(proc)
  assert code != 0, out[-3000:]  # the launcher stops the survivor and reports the failure
  assert rounds_checkpointed(workdir) < ROUNDS
  # The evaluation of the same adapters is the two-process test's; here the training must end the same.
  code, out = finish(launch(2, workdir, "--config.eval.at_end=False"))
  assert code == 0, out[-5000:]
  assert "resuming" in out
  assert_same_run(reference, workdir, rtol=0, evaluation=False)  # bitwise: the same rounds from the same checkpoint
  for client in range(4):
    name = f"adapters/client_{client}/adapter_model.safetensors"
    assert (workdir / name).read_bytes() == (reference / name).read_bytes()


@pytest.mark.slow
def test_sigterm_checkpoints_the_last_round_and_exits_75(tmp_path):
  workdir = tmp_path / "term"
  proc = launch(2, workdir, rounds=3)  # the signal lands in round 1 of 3
  wait_for(lambda: (workdir / "metrics.jsonl").exists(), proc, "round 0's metrics")
  proc.send_signal(signal.SIGTERM)  # the launcher passes it on to both processes
  code, out = finish(proc)
  assert code == 75, out[-3000:]
  done = len(metrics(workdir))
  assert 1 <= done < 3 and rounds_checkpointed(workdir) == done, out[-3000:]
  assert "stopped on SIGTERM" in out


def closed_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_unreachable_coordinator_is_a_clear_error_within_the_timeout(tmp_path):
  env = {**ENV, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{closed_port()}", "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": "1"}
  start = time.time()
  run = subprocess.run([sys.executable, "experiments/train.py", *ARGS, f"--workdir={tmp_path}",
                        "--distributed_timeout=5"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
  assert run.returncode == 1
  assert "could not join the job at 127.0.0.1" in run.stderr and "JAX_COORDINATOR_ADDRESS" in run.stderr
  assert time.time() - start < 60


@pytest.mark.parametrize("extra, message", [
    (["--config.mesh.clients=3"], "do not split evenly over 2 processes"),
    (["--config.mesh.clients=2"], "does not match the job's devices"),
    (["--config.fed.num_clients=3"], "3 training clients do not divide over mesh.clients=4"),
])
def test_impossible_layouts_stop_every_process_with_one_error(tmp_path, extra, message):
  env = ENV
  if "mesh.clients=2" in extra[0]:  # 2 devices per process as asked, but the mesh wants 2 in all
    env = {**ENV, "FELLREC_CPU_DEVICES_PER_PROCESS": "2"}
  proc = launch(2, tmp_path, *extra, "--distributed_timeout=30", env=env)
  code, out = finish(proc)
  assert code == 1, out[-3000:]
  assert out.count(message) == 2, out[-3000:]  # each process says it, once
  assert "Traceback" not in out


def test_detect_reads_flags_jax_variables_slurm_and_tpu():
  assert distributed.detect(env={}) is None
  p = distributed.detect("10.0.0.1:1234", 4, 2, env={})
  assert (p.coordinator, p.num_processes, p.process_id, p.source) == ("10.0.0.1:1234", 4, 2, "flags")
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
  assert distributed.detect(env=env).source == "JAX variables"
  assert distributed.detect(env={**env, "JAX_NUM_PROCESSES": "1"}) is None  # one process: nothing to join
  assert distributed.detect(env={"SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "n[1-2]"}).source == "Slurm"
  assert distributed.detect(env={"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1"}) is None
  assert distributed.detect(env={"TPU_WORKER_HOSTNAMES": "a,b"}).source == "TPU pod"
  with pytest.raises(distributed.DistributedError, match="missing --process_id"):
    distributed.detect("h:1", 2, None, env={})
  with pytest.raises(distributed.DistributedError, match="JAX_PROCESS_ID not"):
    distributed.detect(env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})
  with pytest.raises(distributed.DistributedError, match=r"process_id=2 is not in \[0, num_processes=2\)"):
    distributed.detect("h:1", 2, 2, env={})
  with pytest.raises(distributed.DistributedError, match="not host:port"):
    distributed.detect("localhost", 2, 0, env={})
