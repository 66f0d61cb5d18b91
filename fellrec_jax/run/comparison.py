"""Several aggregators on one config and data, side by side (overall and per-client balance), over one
or several seeds."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from fellrec_jax import files
from fellrec_jax.evaluation import metrics
from fellrec_jax.evaluation import plots
from fellrec_jax.run import distributed
from fellrec_jax.run import setup as setup_lib
from fellrec_jax.run import train

logger = logging.getLogger("fellrec_jax")
TABLE_METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")


def compare(config, workdir, aggregators: Sequence[str], seeds: Sequence[int] | None = None) -> dict:
  """Train and evaluate `config` once per aggregator and seed; write compare.md, compare.json and plots.

  One seed (default: the config's) keeps workdir/<aggregator>; several go to workdir/seed_<s>/<aggregator>
  (the seed sets the partition, the initialisation and the data order), summarised by `seed_summary`. Runs
  share one pretrained tiny base model (workdir/base_model). A run whose eval.json exists is not rerun, so
  an interrupted comparison resumes. Returns, with one seed, {aggregator: eval.json report} plus the
  popularity baseline's report under "popularity"; with several, {seed: {aggregator: report}}.
  """
  workdir = Path(workdir)
  unknown = [a for a in aggregators if a not in setup_lib.AGGREGATORS]
  if unknown:
    raise ValueError(f"unknown aggregators {unknown}; choose from {setup_lib.AGGREGATORS}")
  seeds = [int(config.seed)] if not seeds else [int(s) for s in seeds]
  reports, runs = {}, {}
  for seed in seeds:
    for aggregator in aggregators:
      run_dir = workdir / aggregator if len(seeds) == 1 else workdir / f"seed_{seed}" / aggregator
      if not (run_dir / "eval.json").exists():
        run_config = config.copy_and_resolve_references()
        run_config.fed.aggregator, run_config.seed, run_config.eval.at_end = aggregator, seed, True
        if not run_config.model.hf_dir and not run_config.pretrain.cache_dir:
          run_config.pretrain.cache_dir = str(workdir / "base_model")
        logger.info("comparison: seed %d, aggregator %s", seed, aggregator)
        train.train(run_config, run_dir)
      distributed.barrier(f"compared {seed} {aggregator}")  # process 0 has written its eval.json
      reports.setdefault(seed, {})[aggregator] = json.loads((run_dir / "eval.json").read_text())
      runs.setdefault(seed, {})[aggregator] = run_dir
  if distributed.is_main():
    _write(config, workdir, aggregators, reports, runs)
  if len(seeds) > 1:
    return reports
  one = reports[seeds[0]]
  return {**one, "popularity": one[aggregators[0]]["baselines"]["popularity"]}


def _write(config, workdir: Path, aggregators, reports, runs) -> None:
  seeds = list(reports)
  title = (f"# Aggregators on {config.data.path or 'the synthetic default'} ({config.fed.num_clients} clients, "
           f"{config.fed.rounds} rounds, eval mode {config.eval.mode}, seeds {', '.join(map(str, seeds))})\n\n")
  first = reports[seeds[0]]
  if len(seeds) == 1:
    table = metrics.markdown_table({**first, "popularity": first[aggregators[0]]["baselines"]["popularity"]},
                                   TABLE_METRICS)
    note = "min/max/std are across clients (balance); overall is weighted by test users.\n"
  else:
    summary = seed_summary(reports, TABLE_METRICS, baseline="fedavg" if "fedavg" in aggregators else None)
    files.write_json(workdir / "compare.json", summary)
    table = summary_table(summary, TABLE_METRICS)
    note = ("mean over seeds [95% interval, t distribution]; std/min/max across clients, averaged over seeds; "
            "delta: paired difference from FedAvg per seed [95% interval] (seeds where higher / all).\n")
  files.write_text(workdir / "compare.md", f"{title}{table}\n{note}")
  plots.plot_client_bars({**first, "popularity": first[aggregators[0]]["baselines"]["popularity"]},
                         workdir / "compare.png", ("recall@10", "ndcg@10"),
                         title="per-client test metrics by aggregator" + (f" (seed {seeds[0]})" if len(seeds) > 1 else ""))
  curves = {a: [[r["val_loss_weighted"] for r in plots.read_jsonl(runs[s][a] / "metrics.jsonl")] for s in seeds]
            for a in aggregators}
  plots.plot_validation_curves(curves, workdir / "compare_val_loss.png")
  if "fellrec" in aggregators:
    records = plots.read_jsonl(runs[seeds[0]]["fellrec"] / "metrics.jsonl")
    plots.plot_mixing_strip(records, workdir / "compare_fellrec_mixing.png")
  print(table)


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def interval(values: Sequence[float]) -> dict:
  """Mean and 95% interval (t distribution) of values over seeds; one value has no interval."""
  x = np.asarray(values, np.float64)
  mean = float(x.mean())
  if len(x) < 2:
    return {"mean": mean, "lo": None, "hi": None, "n": len(x)}
  half = (_T975[len(x) - 2] if len(x) - 1 <= len(_T975) else 1.96) * float(x.std(ddof=1)) / np.sqrt(len(x))
  return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(x)}


def seed_summary(reports: dict, metric_names: Sequence[str], baseline: str | None = "fedavg") -> dict:
  """Per aggregator, over seeds: each metric's overall value and its balance across clients (std, min, max)
  as mean and 95% interval, the worst client's recall@10, and the paired difference from `baseline`.

  reports: {seed: {aggregator: eval.json report}}, every seed with the same aggregators.
  """
  seeds = list(reports)
  summary = {}
  for aggregator in reports[seeds[0]]:
    runs = [reports[s][aggregator] for s in seeds]
    entry = {"seeds": seeds}
    for m in metric_names:
      entry[m] = interval([r["overall"][m] for r in runs])
      entry[m]["balance"] = {part: interval([r["balance"][m][part] for r in runs]) for part in ("std", "min", "max")}
      if baseline and aggregator != baseline:
        diffs = [r["overall"][m] - reports[s][baseline]["overall"][m] for s, r in zip(seeds, runs)]
        entry[m]["vs_" + baseline] = {**interval(diffs), "higher": int(sum(d > 0 for d in diffs))}
    entry["worst_client_recall@10"] = interval([r["balance"]["recall@10"]["min"] for r in runs])
    summary[aggregator] = entry
  return summary


def summary_table(summary: dict, metric_names: Sequence[str]) -> str:
  """seed_summary as Markdown: per metric the mean [interval], balance std and min, and the paired delta."""
  fmt = lambda i: f"{i['mean']:.4f}" + ("" if i["lo"] is None else f" [{i['lo']:.4f}, {i['hi']:.4f}]")
  header = ["method"]
  for m in metric_names:
    header += [m, f"{m} std", f"{m} min", f"{m} delta"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for aggregator, entry in summary.items():
    cells = [aggregator]
    for m in metric_names:
      delta = next((v for k, v in entry[m].items() if k.startswith("vs_")), None)
      cells += [fmt(entry[m]), fmt(entry[m]["balance"]["std"]), fmt(entry[m]["balance"]["min"]),
                "-" if delta is None else f"{fmt(delta)} ({delta['higher']}/{delta['n']})"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
