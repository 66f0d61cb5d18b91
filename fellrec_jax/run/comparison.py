"""Several aggregators on one config and data, side by side (overall and per-client balance)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from fellrec_jax.evaluation import metrics
from fellrec_jax.evaluation import plots
from fellrec_jax.run import distributed
from fellrec_jax.run import setup as setup_lib
from fellrec_jax.run import train

logger = logging.getLogger("fellrec_jax")
TABLE_METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")


def compare(config, workdir, aggregators: Sequence[str]) -> dict[str, dict]:
  """Train and evaluate `config` once per aggregator (workdir/<aggregator>); write compare.md and
  compare.png. Runs share one pretrained tiny base model (workdir/base_model). Returns the reports."""
  workdir = Path(workdir)
  unknown = [a for a in aggregators if a not in setup_lib.AGGREGATORS]
  if unknown:
    raise ValueError(f"unknown aggregators {unknown}; choose from {setup_lib.AGGREGATORS}")
  reports = {}
  for aggregator in aggregators:
    run_config = config.copy_and_resolve_references()
    run_config.fed.aggregator = aggregator
    run_config.eval.at_end = True
    if not run_config.model.hf_dir and not run_config.pretrain.cache_dir:
      run_config.pretrain.cache_dir = str(workdir / "base_model")
    logger.info("comparison: training with aggregator %s", aggregator)
    train.train(run_config, workdir / aggregator)
    distributed.barrier(f"compared {aggregator}")  # process 0 has written its eval.json
    reports[aggregator] = json.loads((workdir / aggregator / "eval.json").read_text())
  reports["popularity"] = reports[aggregators[0]]["baselines"]["popularity"]
  table = metrics.markdown_table(reports, TABLE_METRICS)
  if not distributed.is_main():
    return reports
  (workdir / "compare.md").write_text(
      f"# Aggregators on {config.data.path or 'the synthetic default'} ({config.fed.num_clients} clients, "
      f"{config.fed.rounds} rounds, eval mode {config.eval.mode})\n\n{table}\n\n"
      "min/max/std are across clients (balance); overall is weighted by test users.\n")
  plots.plot_client_bars(reports, workdir / "compare.png", ("recall@10", "ndcg@10"),
                         title="per-client test metrics by aggregator")
  print(table)
  return reports
