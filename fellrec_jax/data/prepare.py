"""docs/method.md §6 dataset construction: interaction and item tables (or raw Amazon 2018 files) to a Dataset.

`build_dataset` is the one code path for every source: generic tables, Amazon files and the synthetic
generator. Steps (docs/method.md §6, "Dataset construction"):
  1. keep interactions whose item has a usable title; a repeated (user, item) pair keeps the timestamp of
     its last occurrence and the input position of its first (as the reference's dict update does);
  2. iterative k-core on users and items;
  3. global temporal split at T[N-2n] and T[N-n], n = int(split_fraction * N), ties to the later part;
  4-6. train samples (sliding window), valid samples, multi-target test samples;
  7. histories = all of a user's train + valid items.
Items are identified by their title: items sharing a title are one item (the model generates titles and
grounding ranks titles, so two items with one title cannot be told apart). Every dropped row is counted
and logged.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from fellrec_jax.data.dataset import Dataset
from fellrec_jax.data.records import INPUT_END, DataError, format_titles, make_record

GAMES_INSTRUCTION = ("Given a list of video games the user has played before, please recommend a new "
                     "video game that the user likes to the user.")
GAMES_INPUT_PHRASE = "The user has played the following video games before:"

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Construction:
  """Settings of the docs/method.md §6 construction; the defaults are the reference's (Games wording)."""
  k_core: int = 5
  window: int = 10
  split_fraction: float = 0.1
  instruction: str = GAMES_INSTRUCTION
  input_phrase: str = GAMES_INPUT_PHRASE


def build_dataset(interactions: pd.DataFrame, items: pd.DataFrame,
                  construction: Construction = Construction()) -> tuple[Dataset, dict]:
  """Interactions (user, item, timestamp) and items (item, title) to a Dataset, plus counts of every
  filter; validated tables come from `read_*` (columns renamed to user, item, timestamp, title)."""
  _check_construction(construction)
  stats = {"interactions_read": len(interactions), "items_read": len(items)}
  titles = _usable_titles(items, stats)
  table = _titled_interactions(interactions, titles, stats)
  table = k_core(table, construction.k_core, stats)
  table = table.assign(part=temporal_split(table["timestamp"].to_numpy(), construction.split_fraction))
  user_ids, user_keys = _user_ids(table["user"])
  table = table.assign(user=table["user"].map(user_ids))
  catalog = tuple(sorted(table["item"].unique()))
  train, valid, test, histories = _samples(table, catalog, construction, stats)
  stats.update(users=len(histories), items=len(catalog), train_samples=len(train),
               valid_samples=len(valid), test_samples=len(test))
  logger.info("construction counts: %s", ", ".join(f"{k}={v}" for k, v in stats.items()))
  return Dataset(tuple(train), tuple(valid), tuple(test), catalog, histories, user_keys), stats


def k_core(table: pd.DataFrame, k: int, stats: dict | None = None) -> pd.DataFrame:
  """Drops users and items with fewer than k interactions until none remain (a unique fixed point)."""
  iterations = 0
  while True:
    user_counts = table.groupby("user")["item"].transform("size")
    item_counts = table.groupby("item")["user"].transform("size")
    keep = (user_counts >= k) & (item_counts >= k)
    if keep.all():
      break
    table = table[keep]
    iterations += 1
  if stats is not None:
    stats["k_core_iterations"] = iterations
    stats["interactions_after_k_core"] = len(table)
  if table.empty:
    raise DataError(f"the {k}-core is empty: no user and item keep {k} interactions (lower --k_core)")
  return table


def temporal_split(timestamps: np.ndarray, split_fraction: float) -> np.ndarray:
  """0/1/2 (train/valid/test) per interaction: cuts at T[N-2n] and T[N-n], ties to the later part."""
  ordered = np.sort(timestamps, kind="stable")
  total = len(ordered)
  n = int(split_fraction * total)
  if n < 1:
    raise DataError(f"{total} interactions are too few for a {split_fraction:g} valid/test split "
                    f"(int({split_fraction:g} * {total}) = 0)")
  valid_cut, test_cut = ordered[total - 2 * n], ordered[total - n]
  return (timestamps >= valid_cut).astype(np.int8) + (timestamps >= test_cut).astype(np.int8)


def _check_construction(construction: Construction) -> None:
  if construction.k_core < 1:
    raise DataError(f"k_core must be >= 1, got {construction.k_core}")
  if construction.window < 1:
    raise DataError(f"window must be >= 1, got {construction.window}")
  if not 0 < construction.split_fraction < 0.5:
    raise DataError(f"split_fraction must be in (0, 0.5), got {construction.split_fraction}")
  if not construction.instruction.strip():
    raise DataError("the instruction is empty")
  if '"' in construction.input_phrase:
    raise DataError(f"the input phrase may not contain a double quote: {construction.input_phrase!r}")


def _usable_titles(items: pd.DataFrame, stats: dict) -> pd.Series:
  """item -> title for items with a non-empty title that a BIGRec title list can hold."""
  titles = items.drop_duplicates("item", keep="first")
  stats["duplicate_item_rows_dropped"] = len(items) - len(titles)
  present = titles["title"].map(lambda t: isinstance(t, str) and t.strip() != "")
  stats["items_without_title"] = int((~present).sum())
  titles = titles[present]
  quotable = titles["title"].map(_quotable)
  stats["items_with_unquotable_title"] = int((~quotable).sum())
  titles = titles[quotable]
  stats["items_merged_by_title"] = len(titles) - titles["title"].nunique()
  return titles.set_index("item")["title"]


def _quotable(title: str) -> bool:
  try:
    format_titles([title, title])
  except DataError:
    return False
  return True


def _titled_interactions(interactions: pd.DataFrame, titles: pd.Series, stats: dict) -> pd.DataFrame:
  table = interactions.assign(position=np.arange(len(interactions)))
  table = table.assign(item=table["item"].map(titles))
  has_title = table["item"].notna()
  stats["interactions_without_titled_item"] = int((~has_title).sum())
  table = table[has_title]
  grouped = table.groupby(["user", "item"], sort=False)
  table = grouped.agg(timestamp=("timestamp", "last"), position=("position", "first")).reset_index()
  stats["repeated_interactions_merged"] = int(has_title.sum()) - len(table)
  if table.empty:
    raise DataError("no interaction refers to an item with a title")
  return table


def _user_ids(users: pd.Series) -> tuple[dict, dict | None]:
  """Integer user ids are kept; other ids are numbered in sorted order and the keys are kept."""
  unique = users.unique()
  if pd.api.types.is_integer_dtype(users.dtype):
    return {u: int(u) for u in unique}, None
  keys = sorted(str(u) for u in unique)
  number = {key: i for i, key in enumerate(keys)}
  return {u: number[str(u)] for u in unique}, dict(enumerate(keys))


def _samples(table: pd.DataFrame, catalog, construction: Construction, stats: dict):
  """docs/method.md §6 steps 4-7, per user in ascending id order, each user's items ordered by (time, input)."""
  item_id = {title: i for i, title in enumerate(catalog)}
  table = table.sort_values(["user", "timestamp", "position"], kind="stable")
  splits = {"train": [], "valid": [], "test": []}
  histories = {}
  counts = dict.fromkeys(["train_targets_without_history", "valid_without_train_items",
                          "test_users_without_history"], 0)
  for user, rows in table.groupby("user", sort=True):
    parts, titles = rows["part"].to_numpy(), rows["item"].to_numpy()
    items = [list(titles[parts == part]) for part in (0, 1, 2)]
    user_samples, user_counts = user_sample_titles(*items, construction.window)
    for name, samples in user_samples.items():
      splits[name] += [make_record(construction.instruction, construction.input_phrase, history,
                                   INPUT_END, targets, int(user)) for history, targets in samples]
    for key, value in user_counts.items():
      counts[key] += value
    if items[0] or items[1]:
      histories[int(user)] = tuple(item_id[t] for t in items[0] + items[1])
  stats.update(counts)
  return splits["train"], splits["valid"], splits["test"], histories


def user_sample_titles(train: list, valid: list, test: list, window: int) -> tuple[dict, dict]:
  """One user's (history, targets) samples per split from its time-ordered train/valid/test items."""
  samples = {"train": [], "valid": [], "test": []}
  counts = {"train_targets_without_history": 0, "valid_without_train_items": 0,
            "test_users_without_history": 0}
  m = len(train)
  for i in range(min(window, m - 1), m) if m else ():  # m = 0 would give range(-1, 0)
    history = train[max(i - window, 0):i]
    if history:
      samples["train"].append((history, [train[i]]))
    else:
      counts["train_targets_without_history"] += 1
  if train:
    samples["valid"] = [((train + valid[:j])[-window:], [target]) for j, target in enumerate(valid)]
  else:
    counts["valid_without_train_items"] = len(valid)
  if test and (train or valid):
    samples["test"].append(((train + valid)[-window:], test))
  elif test:
    counts["test_users_without_history"] = 1
  return samples, counts


# ---------------------------------------------------------------- readers: generic tables


def read_table(path, columns: dict[str, str]) -> pd.DataFrame:
  """Reads CSV/TSV/Parquet (optionally .gz) and keeps `columns` (role -> column name), renamed to roles.

  Text is read as is: no NA guessing (a title "NA" stays a title), no whitespace stripping.
  """
  path = Path(path)
  if not path.exists():
    raise DataError("file not found", file=path)
  name = path.name.lower().removesuffix(".gz")
  try:
    if name.endswith(".parquet") or name.endswith(".pq"):
      frame = pd.read_parquet(path)
    elif name.endswith(".csv") or name.endswith(".tsv") or name.endswith(".tab"):
      sep = "," if name.endswith(".csv") else "\t"
      frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_filter=False)
    else:
      raise DataError("unknown table format (expected .csv, .tsv, .tab or .parquet, optionally .gz)",
                      file=path)
  except DataError:
    raise
  except Exception as error:  # pandas and pyarrow raise many kinds; name the file either way
    raise DataError(f"cannot read the table: {error}", file=path) from None
  missing = [column for column in columns.values() if column not in frame.columns]
  if missing:
    raise DataError(f"unknown column; the table has columns {list(frame.columns)} "
                    "(rename with the --*_col flags)", file=path, field=missing[0])
  if frame.empty:
    raise DataError("the table has no rows", file=path)
  frame = frame[list(columns.values())].reset_index(drop=True)
  frame.columns = list(columns)
  for role, column in columns.items():
    if role != "title":  # a missing title only drops the item (counted), as in the reference
      _check_no_missing(frame[role], path, column)
  return frame


def read_interactions(path, *, user_col="user_id", item_col="item_id",
                      time_col="timestamp") -> pd.DataFrame:
  """user, item, timestamp (numeric); ids that all look like integers become integers."""
  frame = read_table(path, {"user": user_col, "item": item_col, "timestamp": time_col})
  frame["timestamp"] = _numeric_timestamps(frame["timestamp"], path, time_col)
  frame["user"] = _integers_if_possible(frame["user"])
  frame["item"] = frame["item"].astype(str)
  return frame


def read_items(path, *, item_col="item_id", title_col="title") -> pd.DataFrame:
  frame = read_table(path, {"item": item_col, "title": title_col})
  frame["item"] = frame["item"].astype(str)
  return frame


def _check_no_missing(column: pd.Series, path, name: str) -> None:
  missing = column.isna() | column.map(lambda v: isinstance(v, str) and v == "")
  if missing.any():
    row = int(np.flatnonzero(missing.to_numpy())[0])
    raise DataError("missing value", file=path, index=row, field=name, unit="row")


def _numeric_timestamps(column: pd.Series, path, name: str) -> pd.Series:
  if pd.api.types.is_datetime64_any_dtype(column):
    return column.astype("int64")
  if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
    values = column
  else:
    values = pd.to_numeric(column, errors="coerce")
  bad = values.isna() | ~np.isfinite(values.astype(float))
  if bad.any():
    row = int(np.flatnonzero(bad.to_numpy())[0])
    raise DataError(f"timestamp {column.iloc[row]!r} is not a number", file=path, index=row,
                    field=name, unit="row")
  return values


def _integers_if_possible(column: pd.Series) -> pd.Series:
  if pd.api.types.is_integer_dtype(column):
    return column
  text = column.astype(str)
  if text.str.fullmatch(r"-?\d{1,18}").all():
    return text.astype("int64")
  return text


# ---------------------------------------------------------------- readers: raw Amazon 2018


def read_amazon(reviews_path, meta_path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
  """Amazon 2018 `*_5.json.gz` reviews and `meta_*.json.gz` to interaction and item tables.

  As the reference: reviews need reviewerID, asin, unixReviewTime and overall; reviews with a negative
  rating, without reviewerName, or whose asin has no metadata line are dropped (counted).
  """
  stats = dict.fromkeys(["reviews_read", "reviews_without_reviewer_name", "reviews_negative_rating",
                         "reviews_without_metadata", "meta_lines_read", "meta_lines_without_asin",
                         "meta_duplicate_asins"], 0)
  titles = {}
  for line, obj in _json_lines(meta_path):
    stats["meta_lines_read"] += 1
    if "asin" not in obj:
      stats["meta_lines_without_asin"] += 1
      continue
    asin = _field(obj, "asin", str, meta_path, line)
    title = obj.get("title", "")
    if not isinstance(title, str):
      raise DataError(f"must be a string, got {title!r}", file=meta_path, index=line, field="title",
                      unit="line")
    if asin in titles:
      stats["meta_duplicate_asins"] += 1  # the first line's title is kept
    titles.setdefault(asin, title)
  rows = []
  for line, obj in _json_lines(reviews_path):
    stats["reviews_read"] += 1
    user = _field(obj, "reviewerID", str, reviews_path, line)
    asin = _field(obj, "asin", str, reviews_path, line)
    time = _field(obj, "unixReviewTime", int, reviews_path, line)
    rating = _field(obj, "overall", (int, float), reviews_path, line)
    if rating < 0:
      stats["reviews_negative_rating"] += 1
    elif "reviewerName" not in obj:
      stats["reviews_without_reviewer_name"] += 1
    elif asin not in titles:
      stats["reviews_without_metadata"] += 1
    else:
      rows.append((user, asin, time))
  logger.info("amazon counts: %s", ", ".join(f"{k}={v}" for k, v in stats.items()))
  if not rows:
    raise DataError("no usable review (each needs reviewerName and an asin with metadata)",
                    file=reviews_path)
  interactions = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
  items = pd.DataFrame(list(titles.items()), columns=["item", "title"])
  return interactions, items, stats


def _json_lines(path) -> Iterator[tuple[int, dict]]:
  """(1-based line number, object) for each non-blank line of a JSON-lines file, gzipped or not."""
  path = Path(path)
  if not path.exists():
    raise DataError("file not found", file=path)
  opener = gzip.open if path.name.endswith(".gz") else open
  try:
    with opener(path, "rt", encoding="utf-8") as lines:
      for number, line in enumerate(lines, start=1):
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as error:
          raise DataError(f"malformed JSON at column {error.colno}: {error.msg}", file=path,
                          index=number, unit="line") from None
        if not isinstance(obj, dict):
          raise DataError("a line must hold a JSON object", file=path, index=number, unit="line")
        yield number, obj
  except (OSError, EOFError, UnicodeDecodeError) as error:
    raise DataError(f"cannot read: {error}", file=path) from None


def _field(obj: dict, name: str, kind, path, line: int):
  if name not in obj:
    raise DataError("missing field", file=path, index=line, field=name, unit="line")
  value = obj[name]
  if isinstance(value, bool) or not isinstance(value, kind):
    raise DataError(f"wrong type: {value!r}", file=path, index=line, field=name, unit="line")
  return value


# ---------------------------------------------------------------- entry points (tools/prepare_data.py)


def prepare_from_tables(interactions_path, items_path, construction: Construction = Construction(), *,
                        user_col="user_id", item_col="item_id", time_col="timestamp",
                        items_item_col="item_id", title_col="title") -> tuple[Dataset, dict]:
  interactions = read_interactions(interactions_path, user_col=user_col, item_col=item_col,
                                   time_col=time_col)
  items = read_items(items_path, item_col=items_item_col, title_col=title_col)
  return build_dataset(interactions, items, construction)


def prepare_from_amazon(reviews_path, meta_path,
                        construction: Construction = Construction()) -> tuple[Dataset, dict]:
  interactions, items, amazon_stats = read_amazon(reviews_path, meta_path)
  dataset, stats = build_dataset(interactions, items, construction)
  return dataset, {**amazon_stats, **stats}
