"""Several aggregators on one config and data, side by side (overall and per-client balance), over one
or several seeds."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fellrec_jax import files
from fellrec_jax.evaluation import metrics
from fellrec_jax.evaluation import plots
from fellrec_jax.run import distributed
from fellrec_jax.run import setup as setup_lib
from fellrec_jax.run import train

logger = logging.getLogger("fellrec_jax")
TABLE_METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")


def compare(config, workdir, aggregators: Sequence[str], seeds: Sequence[int] | None = None,
            variants: Mapping[str, Mapping] | None = None, train_missing: bool = True,
            seed_dirs: bool | None = None) -> dict:
  """Train and evaluate `config` once per method and seed; write compare.md, compare.json and plots.

  A method is an aggregator (setup.AGGREGATORS) or a name in `variants`, {name: {section: {field: value}}}:
  overrides of the config that include fed.aggregator (e.g. FELLRec at another alpha). One seed (default:
  the config's) keeps workdir/<method>; several (or seed_dirs=True) go to workdir/seed_<s>/<method>, summarised
  with intervals (the seed sets the
  partition, the initialisation and the data order) by `seed_summary`. The runs of a seed share
  one pretrained tiny base model (workdir/base_model, or base_model/seed_<s>). A run whose eval.json exists
  is not rerun, so an interrupted comparison resumes; with train_missing=False nothing is trained and a
  method without every seed's eval.json is left out of the summary. Returns, with one seed, {method: eval.json report}
  plus the popularity baseline's report under "popularity"; with several, {seed: {method: report}}.
  """
  workdir = Path(workdir)
  variants = dict(variants or {})
  for name in aggregators:
    method_config(config, name, variants.get(name), seed=0)  # every method is known before anything runs
  seeds = [int(config.seed)] if not seeds else [int(s) for s in seeds]
  seed_dirs = len(seeds) > 1 if seed_dirs is None else seed_dirs
  reports, runs = {}, {}
  run_dir = lambda name, seed: workdir / f"seed_{seed}" / name if seed_dirs else workdir / name
  if not train_missing:
    aggregators = [n for n in aggregators if all((run_dir(n, s) / "eval.json").exists() for s in seeds)]
    if not aggregators:
      raise FileNotFoundError(f"no method has finished every seed {seeds} in {workdir}")
  for seed in seeds:
    for name in aggregators:
      if not (run_dir(name, seed) / "eval.json").exists():
        run_config = method_config(config, name, variants.get(name), seed)
        if not run_config.model.hf_dir and not run_config.pretrain.cache_dir:
          base_dir = workdir / "base_model"
          run_config.pretrain.cache_dir = str(base_dir / f"seed_{seed}" if seed_dirs else base_dir)
        logger.info("comparison: seed %d, %s", seed, name)
        train.train(run_config, run_dir(name, seed))
      distributed.barrier(f"compared {seed} {name}")  # process 0 has written its eval.json
      reports.setdefault(seed, {})[name] = json.loads((run_dir(name, seed) / "eval.json").read_text())
      runs.setdefault(seed, {})[name] = run_dir(name, seed)
  if distributed.is_main():
    fellrec = [n for n in aggregators if method_config(config, n, variants.get(n), 0).fed.aggregator == "fellrec"]
    _write(config, workdir, aggregators, reports, runs, fellrec[0] if fellrec else None, seed_dirs)
  if seed_dirs:
    return reports
  one = reports[seeds[0]]
  return {**one, "popularity": one[aggregators[0]]["baselines"]["popularity"]}


def method_config(config, name: str, overrides: Mapping | None, seed: int):
  """`config` for method `name` and `seed`: fed.aggregator = name, or `overrides` ({section: {field: value}},
  fed.aggregator among them) applied; evaluation at the end."""
  c = config.copy_and_resolve_references()
  if overrides is None:
    if name not in setup_lib.AGGREGATORS:
      raise ValueError(f"unknown aggregator {name!r}; choose from {setup_lib.AGGREGATORS} or define it as a variant")
    c.fed.aggregator = name
  for section, fields in (overrides or {}).items():
    for field, value in fields.items():
      if section not in c or field not in c[section]:
        raise ValueError(f"method {name!r} sets {section}.{field}, which the config does not have")
      c[section][field] = value
  if c.fed.aggregator not in setup_lib.AGGREGATORS:
    raise ValueError(f"method {name!r}: fed.aggregator {c.fed.aggregator!r} is not one of {setup_lib.AGGREGATORS}")
  c.seed, c.eval.at_end = int(seed), True
  return c


def _write(config, workdir: Path, aggregators, reports, runs, fellrec: str | None, summarise: bool) -> None:
  seeds = list(reports)
  title = (f"# Aggregators on {config.data.path or 'the synthetic default'} ({config.fed.num_clients} clients, "
           f"{config.fed.rounds} rounds, eval mode {config.eval.mode}, seeds {', '.join(map(str, seeds))})\n\n")
  first = reports[seeds[0]]
  if not summarise:
    table = metrics.markdown_table({**first, "popularity": first[aggregators[0]]["baselines"]["popularity"]},
                                   TABLE_METRICS)
    note = "min/max/std are across clients (balance); overall is weighted by test users.\n"
  else:
    with_popularity = {s: {**r, "popularity": r[aggregators[0]]["baselines"]["popularity"]} for s, r in reports.items()}
    summary = seed_summary(with_popularity, TABLE_METRICS, baseline="fedavg" if "fedavg" in aggregators else None)
    files.write_json(workdir / "compare.json", summary)
    table = summary_table(summary, TABLE_METRICS)
    note = ("mean over seeds [95% interval, t distribution]; std/min/max across clients, averaged over seeds; "
            "delta: paired difference from FedAvg per seed [95% interval] (seeds where higher / all).\n")
  files.write_text(workdir / "compare.md", f"{title}{table}\n{note}")
  plots.plot_client_bars({**first, "popularity": first[aggregators[0]]["baselines"]["popularity"]},
                         workdir / "compare.png", ("recall@10", "ndcg@10"),
                         title="per-client test metrics by aggregator" + (f" (seed {seeds[0]})" if summarise else ""))
  curves = {a: [[r["val_loss_weighted"] for r in plots.read_jsonl(runs[s][a] / "metrics.jsonl")] for s in seeds]
            for a in aggregators}
  plots.plot_validation_curves(curves, workdir / "compare_val_loss.png")
  if fellrec:  # the first FELLRec method
    records = plots.read_jsonl(runs[seeds[0]][fellrec] / "metrics.jsonl")
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
  """Per aggregator, over seeds: each metric's overall value (and its per-seed values) and its balance across
  clients (std, min, max) as mean and 95% interval, the worst client's recall@10, and the paired differences
  from `baseline` of the overall value (per seed, and how many seeds are higher) and of the balance figures.

  reports: {seed: {aggregator: eval.json report}}, every seed with the same aggregators.
  """
  seeds = list(reports)
  summary = {}
  for aggregator in reports[seeds[0]]:
    runs = [reports[s][aggregator] for s in seeds]
    entry = {"seeds": seeds}
    others = [reports[s][baseline] for s in seeds] if baseline and aggregator != baseline else None
    for m in metric_names:
      entry[m] = {**interval([r["overall"][m] for r in runs]), "values": [r["overall"][m] for r in runs]}
      entry[m]["balance"] = {part: interval([r["balance"][m][part] for r in runs]) for part in ("std", "min", "max")}
      if others:
        diffs = [r["overall"][m] - o["overall"][m] for r, o in zip(runs, others)]
        entry[m]["vs_" + baseline] = {**interval(diffs), "higher": int(sum(d > 0 for d in diffs)), "values": diffs}
        for part in ("std", "min", "max"):  # the paired difference of the balance figures too
          entry[m]["balance"][part]["vs_" + baseline] = interval(
              [r["balance"][m][part] - o["balance"][m][part] for r, o in zip(runs, others)])
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


# ----------------------------------------------------------------------------------------------------
# A study (configs/study.py): comparisons of the same methods over the same seeds in several settings.


def run_study(study, workdir, settings: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
              stages: int = 0) -> dict:
  """Run (or resume) `study`'s comparison in each setting (default: study.run_settings) under
  workdir/<setting>, stage by stage (study.stages; only the first `stages` of them when > 0), on its seeds
  (or only `seeds`, a subset of them); log each invocation's wall time to workdir/study_log.jsonl.
  Returns {setting: reports}."""
  workdir = Path(workdir)
  settings = list(settings or study.run_settings)
  unknown = [s for s in settings if s not in study.settings]
  if unknown:
    raise ValueError(f"unknown study settings {unknown}; the study defines {sorted(study.settings)}")
  seeds = list(seeds or study.seeds)
  if not set(seeds) <= set(study.seeds):
    raise ValueError(f"seeds {seeds} are not all among the study's {list(study.seeds)}")
  if not 0 <= stages <= len(study.stages):
    raise ValueError(f"stages={stages}: the study has {len(study.stages)} stages (0 = all of them)")
  start = time.time()
  out = {}
  for name in settings:
    done = []
    for stage in study.stages[:stages or None]:  # each stage's methods on every seed, then the next stage's
      done += list(stage)
      out[name] = compare(study.settings[name], workdir / name, done, seeds=seeds, variants=study.arms,
                          seed_dirs=True)
  if distributed.is_main():
    with open(workdir / "study_log.jsonl", "a", encoding="utf-8") as log:
      log.write(json.dumps({"settings": settings, "seeds": seeds, "stages": stages or len(study.stages),
                            "start": start, "seconds": time.time() - start, "machine": machine()}) + "\n")
  return out


def machine() -> str:
  """The CPU's model name and logical CPU count (lscpu), or the platform's processor string."""
  try:
    lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return f"{fields['Model name'].strip()}, {fields['CPU(s)'].strip()} CPUs"
  except (OSError, subprocess.CalledProcessError, KeyError):
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


DOC_BEGIN = "<!-- generated by experiments/study.py from compare.json: begin -->"
DOC_END = "<!-- generated by experiments/study.py from compare.json: end -->"


def render_study(study, workdir, settings: Sequence[str], doc) -> str:
  """Re-summarise each setting's finished runs (compare.json, plots; nothing trained), render the study's
  tables from the compare.json files, copy the figures next to `doc`, and write the tables between the doc's
  markers (the text around them is kept; a missing doc is started). Returns the generated Markdown."""
  workdir, doc = Path(workdir), Path(doc)
  figures = doc.parent / doc.stem
  parts = [study_header(study, settings, read_study_log(workdir / "study_log.jsonl"))]
  for name in settings:
    seeds = finished_seeds(study, workdir / name)
    compare(study.settings[name], workdir / name, list(study.methods), seeds=seeds, variants=study.arms,
            train_missing=False, seed_dirs=True)
    summary = json.loads((workdir / name / "compare.json").read_text())
    missing = [m for m in study.methods if m not in summary]
    minutes = sum(run_seconds(workdir / name / f"seed_{s}" / m) for s in seeds for m in summary if m in study.arms) / 60
    parts.append(setting_section(name, study, summary, _figures(study, workdir / name, figures, name, doc.parent),
                                 seeds, missing, minutes))
  generated = "\n".join(parts)
  text = doc.read_text() if doc.exists() else f"# The aggregator study\n\n{DOC_BEGIN}\n{DOC_END}\n"
  if DOC_BEGIN not in text or DOC_END not in text:
    raise ValueError(f"{doc} has no generated part: add the lines {DOC_BEGIN!r} and {DOC_END!r}")
  head, rest = text.split(DOC_BEGIN, 1)
  doc.write_text(f"{head}{DOC_BEGIN}\n{generated}\n{DOC_END}{rest.split(DOC_END, 1)[1]}")
  return generated


def finished_seeds(study, setting_dir: Path) -> list[int]:
  """The study's seeds on which every method of its first stage has finished (eval.json)."""
  seeds = [s for s in study.seeds
           if all((setting_dir / f"seed_{s}" / m / "eval.json").exists() for m in study.stages[0])]
  if not seeds:
    raise FileNotFoundError(f"{setting_dir}: no seed has finished runs of {list(study.stages[0])} yet")
  return seeds


def run_seconds(run_dir) -> float:
  """A finished run's wall time: from the first line of its train.log to its eval.json (0 without a log)."""
  run_dir = Path(run_dir)
  log = run_dir / "train.log"
  if not log.exists():
    return 0.0
  with open(log, encoding="utf-8") as f:
    first = f.readline()
  start = datetime.datetime.strptime(first[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
  return max(0.0, (run_dir / "eval.json").stat().st_mtime - start)


def read_study_log(path) -> list[dict]:
  path = Path(path)
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def study_header(study, settings: Sequence[str], log: Sequence[Mapping]) -> str:
  """What ran: seeds, methods, FELLRec's grid, each setting's sizes, the machine and the wall time."""
  seconds = sum(entry["seconds"] for entry in log)
  machines = sorted({entry["machine"] for entry in log}) or [machine()]
  lines = [f"Seeds: {', '.join(map(str, study.seeds))}. Methods ({len(study.methods)}): "
           + "; ".join(f"`{m}` = {method_label(m, study.arms[m])}" for m in study.methods) + ".",
           "",
           f"Machine: {'; '.join(machines)}." + (f" Invocations of the study that ran to their end: {len(log)}, "
                                                  f"{seconds / 60:.1f} min." if log else ""),
           "",
           "| setting | data | clients | train records | rounds x local epochs | model | ranking |",
           "|---|---|---|---|---|---|---|"]
  for name in settings:
    c = study.settings[name]
    data = c.data.path or f"synthetic ({c.data.synthetic.num_users} users, group_skew {c.data.synthetic.group_skew})"
    lines.append(f"| {name} | {data}, partition {c.data.partition} | {c.fed.num_clients} | "
                 f"{c.data.max_train_samples or 'all'} | {c.fed.rounds} x {c.fed.local_epochs} | "
                 f"d={c.model.hidden_size}, L={c.model.num_layers}, LoRA r={c.lora.rank} | {c.eval.mode}"
                 f"{f', {c.eval.max_test_users} test users per client' if c.eval.max_test_users else ''} |")
  return "\n".join(lines) + "\n"


def method_label(name: str, overrides: Mapping) -> str:
  """A method's name as a reader knows it, e.g. 'FELLRec alpha=0.7 beta=1 (per-client init)'."""
  fed = overrides.get("fed", {})
  aggregator = fed.get("aggregator", name)
  label = {"fellrec": "FELLRec", "fedavg": "FedAvg", "fedprox": "FedProx", "ditto": "Ditto", "local": "local only",
           "centralized": "centralized", "popularity": "popularity"}.get(aggregator, aggregator)
  if aggregator == "fellrec":
    f = overrides.get("fellrec", {})
    init = fed.get("adapter_init", "per_client").replace("_", "-")
    label += f" alpha={f.get('alpha'):g} beta={f.get('beta'):g} ({init} init)"
  return label


def _fmt(i: Mapping, digits: int = 3) -> str:
  if i["lo"] is None:
    return f"{i['mean']:.{digits}f}"
  return f"{i['mean']:.{digits}f} [{i['lo']:.{digits}f}, {i['hi']:.{digits}f}]"


def setting_section(name: str, study, summary: Mapping, figures: Sequence[tuple[str, str]] = (),
                    seeds: Sequence[int] = (), missing: Sequence[str] = (), minutes: float | None = None) -> str:
  """One setting's tables from its compare.json summary: overall and balance, and the paired differences;
  which seeds they cover and which methods have not finished on all of them."""
  label = lambda m: method_label(m, study.arms[m]) if m in study.arms else method_label(m, {})
  covered = f"Seeds finished: {', '.join(map(str, seeds))} (of {', '.join(map(str, study.seeds))})." if seeds else ""
  if missing:
    covered += f" Not finished on these seeds, so not in the tables: {', '.join(missing)}."
  if minutes is not None:
    covered += (f" Wall time of the runs in the tables: {minutes:.0f} min (each from the first line of its "
                "train.log to its eval.json).")
  lines = [f"### Setting `{name}`", "", *([covered, ""] if covered else []),
           "Mean over seeds [95% interval, t distribution]. Balance: std, minimum (the worst client) and maximum of "
           "the clients' recall@10, per seed, then averaged.", "",
           "| method | recall@10 | ndcg@10 | recall@20 | ndcg@20 | clients' std | worst client | best client |",
           "|---|---|---|---|---|---|---|---|"]
  for method, e in summary.items():
    b = e["recall@10"]["balance"]
    lines.append(f"| {label(method)} | " + " | ".join(_fmt(e[m]) for m in TABLE_METRICS)
                 + f" | {_fmt(b['std'])} | {_fmt(b['min'])} | {_fmt(b['max'])} |")
  base = study.paired_with
  paired = [(m, e) for m, e in summary.items() if f"vs_{base}" in e["recall@10"]]
  if paired:
    lines += ["", f"Paired with {label(base)} (method minus {label(base)} on the same seed; in brackets the 95% "
              "interval; (k/n): seeds where the method is higher). Lower std and higher worst client are more even.",
              "", f"| method | recall@10 | per seed | ndcg@10 | clients' std of recall@10 | worst client's recall@10 |",
              "|---|---|---|---|---|---|"]
    for method, e in paired:
      d = e["recall@10"][f"vs_{base}"]
      per_seed = ", ".join(f"{v:+.3f}" for v in d["values"])
      balance = e["recall@10"]["balance"]
      lines.append(f"| {label(method)} | {_signed(d)} ({d['higher']}/{d['n']}) | {per_seed} | "
                   f"{_signed(e['ndcg@10'][f'vs_{base}'])} | {_signed(balance['std'][f'vs_{base}'])} | "
                   f"{_signed(balance['min'][f'vs_{base}'])} |")
  for caption, path in figures:
    lines += ["", f"![{caption}]({path})"]
  return "\n".join(lines) + "\n"


def _signed(i: Mapping) -> str:
  if i["lo"] is None:
    return f"{i['mean']:+.3f}"
  return f"{i['mean']:+.3f} [{i['lo']:+.3f}, {i['hi']:+.3f}]"


def _figures(study, setting_dir: Path, figures: Path, name: str, doc_dir: Path) -> list[tuple[str, str]]:
  """Copy the validation curves and draw the mixing strips of the FELLRec methods at the shared-init point
  (seed of the first run) into `figures`; [(caption, path relative to the doc)]."""
  out = []
  curves = setting_dir / "compare_val_loss.png"
  if curves.exists():
    target = figures / f"{name}_val_loss.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(curves, target)
    out.append((f"{name}: weighted validation loss per round, every method and seed", target))
  seed = study.seeds[0]
  for method, overrides in study.arms.items():
    f = overrides.get("fellrec", {})
    at_point = (f.get("alpha"), f.get("beta")) == tuple(study.shared_init_point)
    metrics_file = setting_dir / f"seed_{seed}" / method / "metrics.jsonl"
    if overrides.get("fed", {}).get("aggregator") == "fellrec" and at_point and metrics_file.exists():
      target = plots.plot_mixing_strip(plots.read_jsonl(metrics_file), figures / f"{name}_mixing_{method}.png")
      out.append((f"{name}: {method_label(method, overrides)}, seed {seed}: mixing matrix and warm weights per round",
                  target))
  return [(caption, str(Path(path).relative_to(doc_dir))) for caption, path in out]
