r"""Builds a dataset directory (docs/data.md) from interaction/item tables or raw Amazon 2018 files.

  python tools/prepare_data.py --interactions ratings.csv --items movies.csv --out data/movies \
      --user_col userId --item_col movieId --items_item_col movieId --title_col title \
      --instruction "Given a list of movies the user has watched before, please recommend a new movie that the user likes to the user." \
      --input_phrase "The user has watched the following movies before:"
  python tools/prepare_data.py --amazon_reviews Video_Games_5.json.gz \
      --amazon_meta meta_Video_Games.json.gz --out data/games
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from fellrec_jax.data import prepare
from fellrec_jax.data.dataset import save_dataset  # noqa: E402
from fellrec_jax.data.records import DataError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
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


def main(argv=None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  args = parse_args(argv)
  construction = prepare.Construction(k_core=args.k_core, window=args.window,
                                      split_fraction=args.split_fraction,
                                      instruction=args.instruction, input_phrase=args.input_phrase)
  try:
    if args.interactions:
      dataset, stats = prepare.prepare_from_tables(
          args.interactions, args.items, construction, user_col=args.user_col,
          item_col=args.item_col, time_col=args.time_col, items_item_col=args.items_item_col,
          title_col=args.title_col)
    else:
      dataset, stats = prepare.prepare_from_amazon(args.amazon_reviews, args.amazon_meta,
                                                   construction)
  except DataError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  save_dataset(args.out, dataset)
  width = max(map(len, stats))
  print("\n".join(f"{key:<{width}}  {value:,}" for key, value in stats.items()))
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
