"""Evaluation of a federated run (docs/method.md §5): each client's best adapters on its own test users.

Writes `eval.json` (overall, per-client and balance parts, plus the popularity baseline under
`baselines`), `predictions.jsonl` (what each test user got) and PNG plots (per-client bars, per-round
curves). `evaluate_workdir` reloads a finished or interrupted run from its checkpoint.
"""

from __future__ import annotations

import json
import shutil
import logging
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from fellrec_jax import files
from fellrec_jax.federated import sharding
from fellrec_jax.run import checkpoint
from fellrec_jax.run import distributed
from fellrec_jax.run import setup as setup_lib
from fellrec_jax.run import state as state_lib
from fellrec_jax.evaluation import metrics
from fellrec_jax.evaluation import plots
from fellrec_jax.data import prompts
from fellrec_jax.evaluation import recommend
from fellrec_jax.data.records import parse_record

logger = logging.getLogger("fellrec_jax")
EVAL_MODES = recommend.MODES


def ranking_config(config) -> recommend.RankingConfig:
  e = config.eval
  return recommend.RankingConfig(mode=e.mode, ks=tuple(e.ks), num_beams=e.num_beams,
                                 max_new_tokens=e.max_new_tokens, generation_batch=e.batch_size)


def test_cases(run, max_per_client: int = 0):
  """Per client, its test cases (the first `max_per_client` of them when > 0)."""
  cases = [run.data.test_cases(c) for c in range(run.num_clients)]
  return [c[:max_per_client] if max_per_client else c for c in cases]


def popularity_report(run, cases, ks) -> dict:
  """The popularity baseline: items ranked by how often they are a training target, history excluded."""
  dataset = run.data.dataset
  targets = [dataset.item_ids(parse_record(r).targets) for r in dataset.train]
  counts = metrics.item_counts(targets, len(dataset.catalog))
  per_client, users, ids = [], [], []
  for client, client_cases in enumerate(cases):
    truth = [c.target_item_ids for c in client_cases]
    if not any(truth):
      continue
    ranked = metrics.popularity_ranking(counts, [c.history_item_ids for c in client_cases], max(ks))
    per_client.append(metrics.topk_metrics(ranked, truth, ks))
    users.append(sum(1 for t in truth if t))
    ids.append(client)
  return metrics.client_report(per_client, users, ids)


def evaluate(run, best_adapters, *, out_dir=None, write: bool = True) -> dict:
  """eval.json's report for `best_adapters` [C, ...]; with write, eval.json, predictions and plots.

  Each process ranks the test users of its own clients; the results meet in the workdir, and every
  process returns the same report (process 0 writes the files).
  """
  config, data = run.config, run.data
  start = time.perf_counter()
  rcfg = ranking_config(config)
  cases = test_cases(run, config.eval.max_test_users)
  reference_prompts = [prompts.prompt_text(r) for r in data.dataset.test[:3]]
  params_key = config.model.hf_dir or None
  with distributed.main_first("catalog"):  # process 0 writes the catalog's embedding cache, the others read it
    catalog = recommend.prepare_catalog(run.base, run.model_cfg, data.tokenizer, data.dataset.catalog,
                                        reference_prompts, rcfg, cache_dir=run.workdir / "cache",
                                        params_key=params_key)
  adapters = sharding.to_host(best_adapters)
  lcfg = run.lcfg.__class__(run.lcfg.rank, run.lcfg.alpha, 0.0, run.lcfg.targets, run.lcfg.use_rslora)
  mine = distributed.local_clients(run.mesh, run.num_clients)
  results = recommend.rank_clients(run.base, run.model_cfg, lcfg, data.tokenizer, catalog, adapters, cases, rcfg,
                                   clients=mine)
  results = all_results(results, Path(out_dir or run.workdir))
  report, rankings = recommend.report_of(results), {c: r.ranking for c, r in results.items()}
  report["baselines"] = {"popularity": popularity_report(run, cases, rcfg.ks)}
  report["settings"] = {"mode": rcfg.mode, "num_beams": rcfg.num_beams, "max_new_tokens": rcfg.max_new_tokens,
                        "test_cases": sum(map(len, cases)), "seconds": round(time.perf_counter() - start, 1)}
  logger.info("evaluation (%s) of %d test cases in %.1f s: recall@10 %.4f (popularity %.4f)", rcfg.mode,
              sum(map(len, cases)), time.perf_counter() - start, report["overall"].get("recall@10", float("nan")),
              report["baselines"]["popularity"]["overall"].get("recall@10", float("nan")))
  if write and distributed.is_main():
    write_outputs(Path(out_dir or run.workdir), report, rankings, cases, catalog.titles)
    print(metrics.text_table(report))
  return report


def all_results(mine: dict, workdir: Path) -> dict:
  """Every process's client results (each process holds its own clients'), exchanged through the workdir."""
  if jax.process_count() == 1:
    return mine
  parts = workdir / "eval_parts"
  parts.mkdir(parents=True, exist_ok=True)
  encoded = {c: {"metrics": r.metrics, "num_test_users": r.num_test_users, "items": r.ranking.items.tolist(),
                 "predictions": r.ranking.predictions} for c, r in mine.items()}
  files.write_json(parts / f"process_{jax.process_index()}.json", encoded, indent=None)
  distributed.barrier("eval_parts_written")
  results = {}
  for path in sorted(parts.glob("process_*.json")):
    for client, r in json.loads(path.read_text()).items():
      ranking = recommend.Ranking(np.asarray(r["items"], np.int64), r["predictions"])
      results[int(client)] = recommend.ClientResult(r["metrics"], r["num_test_users"], ranking)
  distributed.barrier("eval_parts_read")
  if distributed.is_main():
    shutil.rmtree(parts)
  return results


def write_outputs(out_dir: Path, report: dict, rankings, cases, titles) -> None:
  out_dir.mkdir(parents=True, exist_ok=True)
  files.write_json(out_dir / "eval.json", report)
  lines = [json.dumps({"client": client, "user": int(case.user), "prediction": prediction,
                       "ranked_item_ids": [int(i) for i in items[:10]],
                       "ranked_titles": [titles[i] for i in items[:3] if i >= 0],
                       "target_item_ids": [int(i) for i in case.target_item_ids]}) + "\n"
           for client, ranking in sorted(rankings.items())
           for case, items, prediction in zip(cases[client], ranking.items, ranking.predictions)]
  files.write_text(out_dir / "predictions.jsonl", "".join(lines))
  reports = {"model": report, "popularity": report["baselines"]["popularity"]}
  plots.plot_client_bars(reports, out_dir / "eval_clients.png", title="per-client test metrics")
  if (out_dir / "metrics.jsonl").exists():
    plots.plot_round_curves(plots.read_jsonl(out_dir / "metrics.jsonl"), out_dir / "rounds.png")


def load_config(workdir) -> ml_collections.ConfigDict:
  """The config a run in `workdir` was trained with (its config.json)."""
  path = Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no config.json (is {workdir} the workdir of a train.py run?)")
  raw = json.loads(path.read_text())
  config = ml_collections.ConfigDict(raw)
  config.lora.targets = tuple(config.lora.targets)
  config.eval.ks = tuple(config.eval.ks)
  return config


def evaluate_workdir(workdir, **eval_overrides) -> dict:
  """Evaluate the best adapters of the run in `workdir` (from its latest checkpoint)."""
  config = load_config(workdir)
  config.model.init_adapters = ""  # the checkpoint holds the adapters: the ones the run started from are not read
  if "log" in config:  # nor are the run's trackers written to
    config.log.tensorboard, config.log.wandb_project = False, ""
  for key, value in eval_overrides.items():
    if value is not None:
      config.eval[key] = value
  run = setup_lib.setup(config, workdir)
  mngr = checkpoint.manager(run.workdir / "checkpoints", config.keep_checkpoints)
  restored = checkpoint.restore(mngr, state_lib.checkpointable(state_lib.init_state(run)))
  if restored is None:
    raise FileNotFoundError(f"{run.workdir / 'checkpoints'}: no checkpoint to evaluate")
  step, saved, _ = restored
  logger.info("evaluating the best adapters of %s after round %d", workdir, step - 1)
  return evaluate(run, saved["best_adapters"])
