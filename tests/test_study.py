"""The study (configs/study.py, experiments/study.py): its definition is complete and fixed, and docs/study.md's
tables are rendered from compare.json as they should be (hand-made reports; nothing is trained)."""

import datetime
import json
import os

import numpy as np
import pytest

from configs import study as study_config
from fellrec_jax.run import comparison
from fellrec_jax.run import setup as setup_lib


@pytest.fixture(scope="module")
def study():
  return study_config.get_config()


def test_the_study_lists_every_aggregator_both_inits_the_fixed_grid_and_five_seeds(study):
  assert len(study.seeds) >= 5 and len(set(study.seeds)) == len(study.seeds)
  assert sorted(study.methods) == sorted(study.arms) and len(study.methods) == len(set(study.methods))
  configs = {name: comparison.method_config(study.settings[s], name, study.arms[name], seed=1)
             for s in study.settings for name in study.methods}
  assert {c.fed.aggregator for c in configs.values()} == set(setup_lib.AGGREGATORS)
  fellrec = {(c.fellrec.alpha, c.fellrec.beta, c.fed.adapter_init) for c in configs.values()
             if c.fed.aggregator == "fellrec"}
  # The grid written down before any run: changing it makes another study (and docs/study.md says which).
  assert study_config.ALPHAS == (0.35, 0.7) and study_config.BETAS == (1.0, 5.0)
  assert {(a, b, "per_client") for a in study_config.ALPHAS for b in study_config.BETAS} <= fellrec
  assert (*study.shared_init_point, "shared") in fellrec and len(fellrec) == 5
  # Every baseline starts as the FELLRec points do (per-client adapters): one setting in a comparison.
  assert all(c.fed.adapter_init == "per_client" for n, c in configs.items() if not n.endswith("_shared"))
  assert study.paired_with in study.methods and set(study.run_settings) <= set(study.settings)
  stages = [m for stage in study.stages for m in stage]
  assert sorted(stages) == sorted(study.methods) and study.stages[0] == (study.paired_with, "fellrec_a070_b1")


def test_run_study_trains_stage_by_stage_seed_by_seed_and_resumes(tmp_path, study, monkeypatch):
  trained = []

  def fake_train(config, workdir):
    trained.append((workdir.parent.name, workdir.name))
    workdir.mkdir(parents=True)
    (workdir / "eval.json").write_text(json.dumps(_report(0.1 + config.seed / 100, [0.1, 0.2])))
    (workdir / "metrics.jsonl").write_text(json.dumps({"round": 0, "val_loss_weighted": 1.0, "aggregation": [[1.0]],
                                                       "clients": [{"client": 0, "warm_weight": 1.0}]}) + "\n")

  monkeypatch.setattr(comparison.train, "train", fake_train)
  s = study.copy_and_resolve_references()
  s.seeds, s.stages = (0, 1, 2), (("fedavg", "fellrec_a070_b1"), ("local",))
  with pytest.raises(ValueError, match=r"seeds \[7\]"):
    comparison.run_study(s, tmp_path, ["synthetic"], seeds=[7])
  with pytest.raises(ValueError, match="stages=3: the study has 2 stages"):
    comparison.run_study(s, tmp_path, ["synthetic"], stages=3)
  comparison.run_study(s, tmp_path, ["synthetic"], seeds=[2], stages=1)  # the first stage only
  assert trained == [("seed_2", "fedavg"), ("seed_2", "fellrec_a070_b1")]
  comparison.run_study(s, tmp_path, ["synthetic"], seeds=[2])  # one seed now: the next run does the others
  assert trained == [("seed_2", "fedavg"), ("seed_2", "fellrec_a070_b1"), ("seed_2", "local")]
  trained.clear()
  comparison.run_study(s, tmp_path, ["synthetic"])
  assert trained == [("seed_0", "fedavg"), ("seed_0", "fellrec_a070_b1"), ("seed_1", "fedavg"),
                     ("seed_1", "fellrec_a070_b1"), ("seed_0", "local"), ("seed_1", "local")]
  assert list(json.loads((tmp_path / "synthetic" / "compare.json").read_text())) == [
      "fedavg", "fellrec_a070_b1", "local", "popularity"]
  trained.clear()
  comparison.run_study(s, tmp_path, ["synthetic"])
  assert trained == [] and [e["seeds"] for e in comparison.read_study_log(tmp_path / "study_log.jsonl")] == [
      [2], [2], [0, 1, 2], [0, 1, 2]]


def test_a_method_override_of_a_missing_field_or_aggregator_is_an_error_naming_it(study):
  config = study.settings.synthetic
  with pytest.raises(ValueError, match="fellrec.gamma"):
    comparison.method_config(config, "odd", {"fed": {"aggregator": "fellrec"}, "fellrec": {"gamma": 1.0}}, 0)
  with pytest.raises(ValueError, match="unknown aggregator 'fedsgd'"):
    comparison.method_config(config, "fedsgd", None, 0)
  with pytest.raises(ValueError, match="'fedopt'"):
    comparison.method_config(config, "odd", {"fed": {"aggregator": "fedopt"}}, 0)


def _report(overall, clients):
  """An eval.json report: overall recall/ndcg and per-client recall@10 (balance from them)."""
  balance = {"std": float(np.std(clients)), "min": min(clients), "max": max(clients)}
  names = comparison.TABLE_METRICS
  popularity = {"overall": {m: 0.01 for m in names}, "balance": {m: {"std": 0, "min": 0, "max": 0} for m in names},
                "clients": [{"client": c, "num_test_users": 1, **{m: 0.01 for m in names}}
                            for c in range(len(clients))]}
  return {"overall": {m: overall for m in names}, "balance": {m: dict(balance) for m in names},
          "clients": [{"client": c, "num_test_users": 1, **{m: v for m in names}} for c, v in enumerate(clients)],
          "baselines": {"popularity": popularity}}


# FedAvg and one FELLRec point on 3 seeds; FELLRec higher by 0.01, 0.03, 0.05 and more even (std, min).
VALUES = {"fedavg": [(0.20, [0.1, 0.3]), (0.22, [0.1, 0.34]), (0.24, [0.12, 0.36])],
          "fellrec_a070_b1": [(0.21, [0.18, 0.24]), (0.25, [0.2, 0.3]), (0.29, [0.25, 0.33])]}


def _study_on_disk(tmp_path, study):
  s = study.copy_and_resolve_references()
  s.seeds, s.methods, s.run_settings = (0, 1, 2), ("fedavg", "fellrec_a070_b1", "local"), ("synthetic",)
  for method, runs in VALUES.items():
    for seed, (overall, clients) in enumerate(runs):
      run = tmp_path / "runs" / "synthetic" / f"seed_{seed}" / method
      run.mkdir(parents=True)
      (run / "eval.json").write_text(json.dumps(_report(overall, clients)))
      (run / "train.log").write_text("2026-01-01 00:00:00,000 INFO fellrec_jax: started\n")
      started = datetime.datetime(2026, 1, 1).timestamp()
      os.utime(run / "eval.json", (started + 600, started + 600))  # every run took 10 minutes
      rounds = [{"round": r, "val_loss_weighted": 1.0 / (r + 1) + overall, "aggregation": [[0.6, 0.4], [0.3, 0.7]],
                 "clients": [{"client": c, "warm_weight": 0.5} for c in range(2)]} for r in range(2)]
      (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
  (tmp_path / "runs" / "study_log.jsonl").write_text(json.dumps(
      {"settings": ["synthetic"], "start": 0, "seconds": 1800.0, "machine": "Test CPU, 2 CPUs"}) + "\n")
  return s


def test_render_study_writes_the_tables_from_compare_json_between_the_markers(tmp_path, study):
  s = _study_on_disk(tmp_path, study)
  doc = tmp_path / "docs" / "study.md"
  doc.parent.mkdir()
  doc.write_text(f"# Study\n\nwritten by hand\n\n{comparison.DOC_BEGIN}\nold tables\n{comparison.DOC_END}"
                 "\n\nconclusions\n")
  comparison.render_study(s, tmp_path / "runs", ["synthetic"], doc)
  text = doc.read_text()
  assert text.startswith("# Study\n\nwritten by hand\n") and text.endswith("\n\nconclusions\n")
  assert "old tables" not in text
  # 'local' has no finished run: it is left out, the others summarised from compare.json.
  summary = json.loads((tmp_path / "runs" / "synthetic" / "compare.json").read_text())
  assert list(summary) == ["fedavg", "fellrec_a070_b1", "popularity"]  # popularity: the training interactions' ranking
  assert "| popularity | 0.010 [0.010, 0.010] |" in text
  overall = [line for line in text.splitlines() if line.startswith("| FELLRec alpha=0.7 beta=1 (per-client init) | 0.")]
  # FELLRec: mean 0.25, sample std 0.04, half width 4.303 * 0.04 / sqrt(3) = 0.0994; worst client 0.18, 0.2, 0.25.
  assert len(overall) == 1
  assert overall[0].startswith("| FELLRec alpha=0.7 beta=1 (per-client init) | 0.250 [0.151, 0.349] |")
  assert "| 0.210 [0.120, 0.300] |" in overall[0]
  # Paired: differences 0.01, 0.03, 0.05 (3/3 seeds higher).
  paired = [line for line in text.splitlines() if "+0.010, +0.030, +0.050" in line]
  assert len(paired) == 1 and "+0.030 [" in paired[0] and "(3/3)" in paired[0]
  # clients' std (numpy, over 2 clients) 0.03, 0.05, 0.04 against 0.1, 0.12, 0.12: 0.0733 lower, more even;
  # the worst client 0.18, 0.2, 0.25 against 0.1, 0.1, 0.12: 0.1033 higher.
  assert "| -0.073 [" in paired[0] and "| +0.103 [" in paired[0]
  assert "Test CPU, 2 CPUs. Invocations of the study that ran to their end: 1, 30.0 min." in text
  assert "Wall time of the runs in the tables: 60 min" in text  # 6 runs of 10 minutes
  assert (tmp_path / "docs" / "study" / "synthetic_val_loss.png").stat().st_size > 0
  assert (tmp_path / "docs" / "study" / "synthetic_mixing_fellrec_a070_b1.png").stat().st_size > 0
  assert "](study/synthetic_val_loss.png)" in text
  comparison.render_study(s, tmp_path / "runs", ["synthetic"], doc)  # rendering again changes nothing
  assert doc.read_text() == text


def test_a_doc_without_the_markers_is_an_error_naming_them(tmp_path, study):
  s = _study_on_disk(tmp_path, study)
  doc = tmp_path / "study.md"
  doc.write_text("# hand-written only\n")
  with pytest.raises(ValueError, match="generated by experiments/study.py"):
    comparison.render_study(s, tmp_path / "runs", ["synthetic"], doc)


def test_an_unfinished_study_renders_the_seeds_its_first_stage_finished_and_names_what_is_missing(tmp_path, study):
  s = _study_on_disk(tmp_path, study)
  (tmp_path / "runs" / "synthetic" / "seed_2" / "fellrec_a070_b1" / "eval.json").unlink()
  doc = tmp_path / "study.md"
  text = comparison.render_study(s, tmp_path / "runs", ["synthetic"], doc)
  assert "Seeds finished: 0, 1 (of 0, 1, 2). Not finished on these seeds, so not in the tables: local." in text
  assert "+0.010, +0.030 |" in text  # the paired differences of seeds 0 and 1 only
  for run in (tmp_path / "runs" / "synthetic").glob("seed_*/*"):
    (run / "eval.json").unlink(missing_ok=True)
  with pytest.raises(FileNotFoundError, match="no seed has finished"):
    comparison.render_study(s, tmp_path / "runs", ["synthetic"], doc)
