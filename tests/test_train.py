"""End-to-end federated runs on the smoke config: resume equals an uninterrupted run, config checks,
every aggregator, the Games data, and the mesh."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default, games
from fellrec_jax.run import checkpoint
from fellrec_jax.run import train

pytestmark = pytest.mark.slow  # end-to-end runs (conftest.py starts them first)

ROOT = Path(__file__).resolve().parents[1]
GAMES = ROOT.parent / "shared/data/games_bigrec"


def smoke(**overrides):
  config = default.get_config("smoke")
  config.eval.at_end = False
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def metrics(workdir):
  lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  for r in records:
    r.pop("seconds")
  return records


def final_arrays(workdir):
  mngr = checkpoint.manager(Path(workdir) / "checkpoints")
  step = mngr.latest_step()
  state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  leaves, _ = __import__("jax").tree_util.tree_flatten_with_path(state)
  return step, {__import__("jax").tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def test_resume_after_each_round_equals_the_uninterrupted_run(tmp_path):
  """Bitwise, with steps at several sizes (fed.stream_sizes: the plan is the same in every invocation)."""
  config = smoke(**{"fed.rounds": 3, "fed.stream_sizes": 2})
  train.train(config, tmp_path / "whole")
  for _ in range(3):  # three invocations of one round each, as a time-limited batch job would
    train.train(smoke(**{"fed.rounds": 3, "fed.stream_sizes": 2, "max_rounds_per_run": 1}), tmp_path / "pieces")
  assert metrics(tmp_path / "whole") == metrics(tmp_path / "pieces")
  step_a, a = final_arrays(tmp_path / "whole")
  step_b, b = final_arrays(tmp_path / "pieces")
  assert step_a == step_b == 3 and a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # bitwise on CPU
  # A finished run re-run does no more rounds.
  train.train(config, tmp_path / "whole")
  assert len(metrics(tmp_path / "whole")) == 3


def test_metrics_records_have_the_documented_fields(tmp_path):
  train.train(smoke(), tmp_path)
  records = metrics(tmp_path)
  assert [r["round"] for r in records] == [0, 1]
  for r in records:
    assert {"round", "clients", "aggregation", "comm_bytes"} <= r.keys()
    assert len(r["aggregation"]) == len(r["clients"]) == 3
    np.testing.assert_allclose(np.sum(r["aggregation"], axis=1), 1.0, rtol=1e-5)
    assert r["comm_bytes"] > 0 and r["comm_detail"]["split_activations_and_gradients"] > 0
    for c in r["clients"]:
      assert {"client", "train_loss", "val_loss", "lr", "warm_weight"} <= c.keys()
      assert np.isfinite(c["train_loss"]) and 0 < c["warm_weight"] <= 1
  assert (tmp_path / "adapters/client_0/adapter_config.json").exists()
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["rounds_done"] == 2


def test_resume_with_another_config_is_a_clear_error(tmp_path):
  train.train(smoke(**{"fed.rounds": 1}), tmp_path)
  with pytest.raises(checkpoint.ResumeError, match=r"fellrec.alpha: checkpoint has 0.7, config has 0.5"):
    train.train(smoke(**{"fed.rounds": 1, "fellrec.alpha": 0.5}), tmp_path)


@pytest.mark.parametrize("overrides,check", [
    ({"fed.aggregator": "fedavg"}, "identical"),
    ({"fed.aggregator": "fedprox"}, "identical"),
    ({"fed.aggregator": "local"}, "identity"),
    ({"fed.aggregator": "ditto"}, "identity"),
    ({"fed.aggregator": "centralized"}, "one_trainer"),
    ({"fellrec.sequential_update": True, "fed.server_adapters": "shared", "fed.clients_per_chunk": 1}, "mixes"),
])
def test_every_aggregator_runs(tmp_path, overrides, check):
  train.train(smoke(**{"fed.rounds": 1, **overrides}), tmp_path)
  record = metrics(tmp_path)[0]
  matrix = np.asarray(record["aggregation"])
  if check == "identical":
    assert np.allclose(matrix, matrix[0])  # every row is the same sample-weighted mean
  elif check == "identity":
    np.testing.assert_array_equal(matrix if overrides["fed.aggregator"] == "local" else np.eye(3), np.eye(3))
  elif check == "one_trainer":
    steps = [c["num_steps"] for c in record["clients"]]
    assert len(set(steps)) == 1 and record["comm_detail"]["adapter_upload_and_download"] == 0
  else:
    assert (matrix > 0).all() and not np.allclose(matrix, np.eye(3))


def test_impossible_configs_fail_before_any_work(tmp_path):
  with pytest.raises(ValueError, match="fed.aggregator='fedsgd' is unknown"):
    train.train(smoke(**{"fed.aggregator": "fedsgd"}), tmp_path)
  with pytest.raises(ValueError, match="split_k=4 is impossible"):
    train.train(smoke(**{"fed.split_k": 4}), tmp_path / "k")
  with pytest.raises(ValueError, match="mesh.clients \\* mesh.model = 64 devices"):
    train.train(smoke(**{"mesh.clients": 64}), tmp_path / "mesh")


@pytest.mark.skipif(not GAMES.exists(), reason="../shared/data/games_bigrec is not present")
def test_games_config_runs_on_the_bigrec_data(tmp_path):
  config = games.get_config("smoke")
  config.data.path = str(GAMES)
  config.eval.at_end = False
  config.fed.rounds = 1
  train.train(config, tmp_path)
  record = metrics(tmp_path)[0]
  assert len(record["clients"]) == 3 and all(np.isfinite(c["train_loss"]) for c in record["clients"])


MESH_SCRIPT = """
import sys
sys.path.insert(0, "tests")
from test_train import smoke
from fellrec_jax.federated import sharding
from fellrec_jax.run import train
sharding.enough_cpu_threads()  # 3 devices on CI's 2 cores, as experiments/train.py does
train.train(smoke(**{"mesh.clients": 3}), sys.argv[1])
"""


def best_adapters(workdir):
  from safetensors.numpy import load_file
  return [load_file(str(path)) for path in sorted(Path(workdir).glob("adapters/client_*/adapter_model.safetensors"))]


def test_client_mesh_equals_one_device(tmp_path):
  """3 CPU devices with the client-stacked state sharded over mesh.clients=3 give one device's numbers."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
  run = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(tmp_path / "mesh")], env=env, cwd=ROOT,
                       capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  train.train(smoke(), tmp_path / "one")
  a, b = metrics(tmp_path / "one"), metrics(tmp_path / "mesh")
  assert len(a) == len(b) == 2
  for ra, rb in zip(a, b):
    for ca, cb in zip(ra["clients"], rb["clients"]):
      np.testing.assert_allclose(ca["train_loss"], cb["train_loss"], rtol=1e-5)
      np.testing.assert_allclose(ca["val_loss"], cb["val_loss"], rtol=1e-5)
    # The mixing weights are softmax(cosine / 0.05): the cosines' float32 sums over P, reduced in another
    # order across 3 devices, move the weights by ~2e-5 (20x the cosine round-off).
    np.testing.assert_allclose(ra["aggregation"], rb["aggregation"], rtol=0, atol=1e-4)
  for client_a, client_b in zip(best_adapters(tmp_path / "one"), best_adapters(tmp_path / "mesh"), strict=True):
    for key in client_a:
      assert_close_to_scale(client_a[key], client_b[key], key)


def assert_close_to_scale(a, b, name):
  """Equal up to what another reduction order can change, measured against the tensor, not the element.

  Adam divides each gradient by its own running RMS, so an element whose gradient is tiny and changes sign
  with the summation order moves by up to ~lr a step whatever its value: its own relative error can be
  large (seen: 5.5e-4 and 1.3e-3 on one of 512 elements, on AMD and Intel CPUs). Measured against the
  tensor's scale it stays ~1e-3, and the tensor's norm agrees to ~1e-4; what a sharding bug does (a client
  or a shard trained on the wrong data, a missing reduction) changes the tensor by O(1) of its norm.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.abs(a - b).max() <= 1e-2 * np.abs(a).max(), name
  assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(a), name
