"""The command-line programs: `fellrec-train`, `fellrec-evaluate`, `fellrec-compare`, `fellrec-prepare-data`.

Installed with the package (pyproject.toml's console scripts); experiments/train.py, experiments/evaluate.py,
experiments/compare.py and tools/prepare_data.py call the same functions from a checkout. Each absl program
defines its flags when it starts (train and compare both have --config and --workdir, with other defaults).

Config files are Python files given by path (`--config=configs/default.py[:smoke]`, relative to the current
directory); they import their siblings as `configs.<name>`, so the folder above the config's folder goes on
the import path.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from fellrec_jax.data import prepare
from fellrec_jax.data.dataset import save_dataset
from fellrec_jax.data.records import DataError
from fellrec_jax.evaluation import metrics
from fellrec_jax.run import cli
from fellrec_jax.run import comparison
from fellrec_jax.run import distributed
from fellrec_jax.run import evaluate as evaluation
from fellrec_jax.run import tracking
from fellrec_jax.run import train as train_lib

DEFAULT_CONFIG = "configs/default.py"


def config_import_path(argv: Sequence[str], default: str = DEFAULT_CONFIG) -> Path:
  """The folder above the `--config` file's folder (where `configs.<name>` imports resolve)."""
  value = default
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
  return Path(value.split(":", 1)[0]).resolve().parent.parent


def _importable_configs(argv: Sequence[str], default: str = DEFAULT_CONFIG) -> None:
  root = str(config_import_path(argv, default))
  if root not in sys.path:
    sys.path.insert(0, root)


def _run(fn, *args):
  """cli.run, with a tracker that cannot be used (log.*) also reported as one line."""
  try:
    return cli.run(fn, *args)
  except tracking.TrackingError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(1)


def _no_arguments(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")


# ----------------------------------------------------------------------------------------------------
# fellrec-train


def train(argv: Sequence[str] | None = None) -> None:
  """fellrec-train --config=configs/<name>.py[:smoke] [--workdir=DIR] [--config.a.b=value ...]."""
  argv = list(sys.argv if argv is None else argv)
  config_flag = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file (configs/*.py[:smoke]).")
  workdir_flag = flags.DEFINE_string("workdir", None, "Output directory; default runs/<config name>.")

  def main(args):
    _no_arguments(args)
    config = config_flag.value
    cli.run(cli.join, config.mesh.clients * config.mesh.model)
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every checkpoint step at INFO through absl
    config_path = flags.FLAGS["config"].config_filename
    workdir = workdir_flag.value or str(Path("runs") / Path(config_path.split(":")[0]).stem)
    _run(train_lib.train, config, workdir)

  _importable_configs(argv)
  app.run(main, argv)


# ----------------------------------------------------------------------------------------------------
# fellrec-evaluate


def evaluate(argv: Sequence[str] | None = None) -> None:
  """fellrec-evaluate --workdir=RUN [--mode=...] [--max_test_users=N] [--report]."""
  argv = list(sys.argv if argv is None else argv)
  workdir_flag = flags.DEFINE_string("workdir", None, "Workdir of a train.py run.", required=True)
  mode_flag = flags.DEFINE_enum("mode", None, list(evaluation.EVAL_MODES), "Ranking mode (default: the run's config).")
  users_flag = flags.DEFINE_integer("max_test_users", None, "Test cases per client (0 = all).")
  beams_flag = flags.DEFINE_integer("num_beams", None, "Beam width.")
  new_flag = flags.DEFINE_integer("max_new_tokens", None, "Generated tokens.")
  report_flag = flags.DEFINE_bool("report", False, "Print a Markdown table (overall and per client) to paste.")

  def main(args):
    _no_arguments(args)
    config = evaluation.load_config(workdir_flag.value)
    cli.run(cli.join, config.mesh.clients * config.mesh.model)
    absl_logging.set_verbosity(absl_logging.WARNING)
    report = cli.run(evaluation.evaluate_workdir, workdir_flag.value, mode=mode_flag.value,
                     max_test_users=users_flag.value, num_beams=beams_flag.value, max_new_tokens=new_flag.value)
    if report_flag.value and distributed.is_main():  # the plain table is printed by the evaluation
      print("\n" + metrics.markdown_report(report))

  app.run(main, argv)


# ----------------------------------------------------------------------------------------------------
# fellrec-compare


def compare(argv: Sequence[str] | None = None) -> None:
  """fellrec-compare --config=configs/<name>.py [--workdir=DIR] [--aggregators=fellrec,fedavg,...] [--seeds=0,1,2]."""
  argv = list(sys.argv if argv is None else argv)
  config_flag = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file (configs/*.py[:smoke]).")
  workdir_flag = flags.DEFINE_string("workdir", "runs/compare", "Output directory.")
  aggregators_flag = flags.DEFINE_list("aggregators", ["fellrec", "fedavg", "local", "centralized"],
                                       "Aggregators to compare.")
  seeds_flag = flags.DEFINE_list("seeds", [], "Seeds (partition, initialisation, data order), e.g. 0,1,2,3,4: "
                                 "every aggregator runs on every seed; mean and 95% interval (default: the config's).")

  def main(args):
    _no_arguments(args)
    config = config_flag.value
    cli.run(cli.join, config.mesh.clients * config.mesh.model)
    absl_logging.set_verbosity(absl_logging.WARNING)
    seeds = [int(s) for s in seeds_flag.value]
    _run(comparison.compare, config, workdir_flag.value, aggregators_flag.value, seeds)

  _importable_configs(argv)
  app.run(main, argv)


# ----------------------------------------------------------------------------------------------------
# the study (experiments/study.py)

STUDY_CONFIG = "configs/study.py"


def study(argv: Sequence[str] | None = None) -> None:
  """experiments/study.py [--config=configs/study.py] [--workdir=runs/study] [--settings=synthetic,games]
  [--seeds=0,1] [--stages=1] [--render_only] [--doc=docs/study.md]."""
  argv = list(sys.argv if argv is None else argv)
  config_flag = config_flags.DEFINE_config_file("config", STUDY_CONFIG, "Study config (configs/study.py).")
  workdir_flag = flags.DEFINE_string("workdir", "runs/study", "Output directory (one folder per setting).")
  settings_flag = flags.DEFINE_list("settings", [], "Settings to train (default: the study's run_settings).")
  seeds_flag = flags.DEFINE_list("seeds", [], "Train only these of the study's seeds now (default: all of them).")
  stages_flag = flags.DEFINE_integer("stages", 0, "Train only the study's first N stages now (0: every stage).")
  render_flag = flags.DEFINE_bool("render_only", False, "Train nothing: summarise the finished runs again.")
  doc_flag = flags.DEFINE_string("doc", "docs/study.md", "Markdown file whose generated part is rewritten "
                                 "from the results (its images beside it); '' = none.")

  def main(args):
    _no_arguments(args)
    # A run's compiled programs are reused by the next runs of the same shapes (the methods of one seed).
    jax.config.update("jax_compilation_cache_dir", str(Path(workdir_flag.value).resolve() / "jax_cache"))
    absl_logging.set_verbosity(absl_logging.WARNING)
    study_config, workdir = config_flag.value, Path(workdir_flag.value)
    settings = settings_flag.value or list(study_config.run_settings)
    if not render_flag.value:
      _run(comparison.run_study, study_config, workdir, settings, [int(s) for s in seeds_flag.value],
           stages_flag.value)
    if doc_flag.value:
      comparison.render_study(study_config, workdir, settings, doc_flag.value)

  _importable_configs(argv, STUDY_CONFIG)
  app.run(main, argv)


# ----------------------------------------------------------------------------------------------------
# fellrec-prepare-data

PREPARE_USAGE = r"""Builds a dataset directory (docs/data.md) from interaction/item tables or raw Amazon 2018 files.

  fellrec-prepare-data --interactions ratings.csv --items movies.csv --out data/movies \
      --user_col userId --item_col movieId --items_item_col movieId --title_col title \
      --instruction "Given a list of movies the user has watched before, please recommend a new movie that the user likes to the user." \
      --input_phrase "The user has watched the following movies before:"
  fellrec-prepare-data --amazon_reviews Video_Games_5.json.gz \
      --amazon_meta meta_Video_Games.json.gz --out data/games
"""


def prepare_data_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """fellrec-prepare-data's arguments, checked (either tables or Amazon files, each pair complete)."""
  parser = argparse.ArgumentParser(prog="fellrec-prepare-data", description=PREPARE_USAGE,
                                   formatter_class=argparse.RawTextHelpFormatter)
  source = parser.add_argument_group("source (either tables or Amazon files)")
  source.add_argument("--interactions", help="CSV/TSV/Parquet table of (user, item, timestamp)")
  source.add_argument("--items", help="CSV/TSV/Parquet table of (item, title)")
  source.add_argument("--amazon_reviews", help="Amazon 2018 *_5.json.gz reviews")
  source.add_argument("--amazon_meta", help="Amazon 2018 meta_*.json.gz item metadata")
  parser.add_argument("--out", required=True, help="output dataset directory")
  columns = parser.add_argument_group("table columns")
  columns.add_argument("--user_col", default="user_id")
  columns.add_argument("--item_col", default="item_id", help="item column of the interactions")
  columns.add_argument("--time_col", default="timestamp", help="numeric timestamps")
  columns.add_argument("--items_item_col", default="item_id", help="item column of the item table")
  columns.add_argument("--title_col", default="title")
  default = prepare.Construction()
  build = parser.add_argument_group("construction (docs/method.md §6)")
  build.add_argument("--k_core", type=int, default=default.k_core)
  build.add_argument("--window", type=int, default=default.window, help="history length")
  build.add_argument("--split_fraction", type=float, default=default.split_fraction,
                     help="share of interactions in valid and in test (global temporal split)")
  build.add_argument("--instruction", default=default.instruction)
  build.add_argument("--input_phrase", default=default.input_phrase,
                     help="text before the quoted history titles")
  args = parser.parse_args(argv)
  tables = args.interactions or args.items
  amazon = args.amazon_reviews or args.amazon_meta
  if bool(tables) == bool(amazon):
    parser.error("give either --interactions and --items, or --amazon_reviews and --amazon_meta")
  if tables and not (args.interactions and args.items):
    parser.error("--interactions and --items go together")
  if amazon and not (args.amazon_reviews and args.amazon_meta):
    parser.error("--amazon_reviews and --amazon_meta go together")
  return args


def prepare_data(argv: Sequence[str] | None = None) -> int:
  """fellrec-prepare-data: write a dataset directory and print its statistics; 1 on a data error."""
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  args = prepare_data_args(argv)
  construction = prepare.Construction(k_core=args.k_core, window=args.window, split_fraction=args.split_fraction,
                                      instruction=args.instruction, input_phrase=args.input_phrase)
  try:
    if args.interactions:
      dataset, stats = prepare.prepare_from_tables(
          args.interactions, args.items, construction, user_col=args.user_col, item_col=args.item_col,
          time_col=args.time_col, items_item_col=args.items_item_col, title_col=args.title_col)
    else:
      dataset, stats = prepare.prepare_from_amazon(args.amazon_reviews, args.amazon_meta, construction)
  except DataError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  save_dataset(args.out, dataset)
  width = max(map(len, stats))
  print("\n".join(f"{key:<{width}}  {value:,}" for key, value in stats.items()))
  print(f"wrote {args.out}")
  return 0
