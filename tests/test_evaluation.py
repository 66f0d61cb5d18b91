"""A run's evaluation: eval.json's schema, evaluate.py on a workdir, compare.py's table."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fellrec_jax.run import comparison
from fellrec_jax.run import evaluate as evaluation
from fellrec_jax.run import train
from test_train import smoke

# Under pytest-xdist every test of this module runs on one worker (--dist loadgroup, pyproject.toml),
# so its module fixture (the evaluated run) is built once, not once per worker.
pytestmark = pytest.mark.xdist_group("evaluation")

ROOT = Path(__file__).resolve().parents[1]
METRICS = [f"{m}@{k}" for m in ("hr", "precision", "recall", "ndcg", "mrr") for k in (5, 10, 20)]


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = smoke(**{"fed.rounds": 1})
  config.eval.at_end = True
  train.train(config, workdir)
  return workdir


def check_report(report, num_clients):
  assert set(report["overall"]) == set(METRICS)
  assert [c["client"] for c in report["clients"]] == list(range(num_clients))
  for c in report["clients"]:
    assert set(METRICS) <= set(c) and c["num_test_users"] > 0
    assert all(0.0 <= c[m] <= 1.0 for m in METRICS)
  assert set(report["balance"]) == set(METRICS)
  for metric, spread in report["balance"].items():
    values = [c[metric] for c in report["clients"]]
    assert spread["min"] == min(values) and spread["max"] == max(values)
    np.testing.assert_allclose(spread["std"], np.std(values))
  weights = np.array([c["num_test_users"] for c in report["clients"]], float)
  np.testing.assert_allclose(report["overall"]["recall@10"],
                             weights @ [c["recall@10"] for c in report["clients"]] / weights.sum())


def test_eval_json_has_the_documented_schema(evaluated_run):
  report = json.loads((evaluated_run / "eval.json").read_text())
  check_report(report, 3)
  check_report(report["baselines"]["popularity"], 3)
  assert report["settings"]["mode"] == "likelihood" and report["settings"]["test_cases"] == 12
  lines = (evaluated_run / "predictions.jsonl").read_text().splitlines()
  assert len(lines) == 12 and {"client", "user", "prediction", "ranked_item_ids"} <= json.loads(lines[0]).keys()
  for png in ("eval_clients.png", "rounds.png"):
    assert (evaluated_run / png).read_bytes()[:4] == b"\x89PNG"
  assert json.loads((evaluated_run / "summary.json").read_text())["eval"] == report["overall"]


def test_history_items_are_never_recommended(evaluated_run):
  run_cases = {}
  for line in (evaluated_run / "predictions.jsonl").read_text().splitlines():
    row = json.loads(line)
    run_cases.setdefault(row["client"], []).append(row)
  histories = {h["user"]: set(h["items"]) for h in json.loads((evaluated_run / "dataset/histories.json").read_text())}
  checked = 0
  for rows in run_cases.values():
    for row in rows:
      assert histories[row["user"]] and not histories[row["user"]] & set(row["ranked_item_ids"])
      checked += 1
  assert checked == 12


def test_evaluate_script_reevaluates_a_workdir_in_another_mode(evaluated_run):
  subprocess.run([sys.executable, str(ROOT / "experiments/evaluate.py"), f"--workdir={evaluated_run}",
                  "--mode=constrained", "--max_test_users=2"], check=True, cwd=ROOT, capture_output=True)
  report = json.loads((evaluated_run / "eval.json").read_text())
  assert report["settings"] == {**report["settings"], "mode": "constrained", "test_cases": 6}
  check_report(report, 3)


def test_evaluating_a_workdir_without_a_run_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    evaluation.evaluate_workdir(tmp_path)


def test_compare_writes_a_table_of_aggregators(tmp_path):
  config = smoke(**{"fed.rounds": 1, "eval.max_test_users": 2, "eval.max_new_tokens": 4})
  reports = comparison.compare(config, tmp_path, ["fellrec", "local"])
  assert set(reports) == {"fellrec", "local", "popularity"}
  table = (tmp_path / "compare.md").read_text()
  for name in ("fellrec", "local", "popularity", "recall@10 overall", "recall@10 std"):
    assert name in table
  assert (tmp_path / "compare.png").exists()
  assert (tmp_path / "base_model/config.json").exists()  # one pretrained base shared by the runs
  assert not (tmp_path / "local/base_model").exists()
