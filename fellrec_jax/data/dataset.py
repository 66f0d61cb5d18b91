"""The dataset directory format: BIGRec splits, an item catalog and each user's train+valid history.

A directory holds
  train.json, valid.json, test.json   BIGRec records (records.py), each with `user`;
  items.json       [{"id": 0, "title": "..."}, ...]  the catalog, ids 0..n-1 in order, titles unique;
  histories.json   [{"user": 7, "items": [3, 0, 12]}, ...]  every user's train+valid item ids in time order
                   (masked out of the ranking at evaluation);
  users.json       optional: [{"user": 0, "key": "A2XY..."}]  original ids when prepare renumbered users.
A plain BIGRec directory (the three splits only) also loads: the catalog and histories are derived
from the records (see `derive_catalog`, `derive_histories`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

from fellrec_jax import files
from fellrec_jax.data.records import DataError, Record, load_records, parse_record, save_records

SPLITS = ("train", "valid", "test")
CATALOG_FILE = "items.json"
HISTORIES_FILE = "histories.json"
USERS_FILE = "users.json"

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train/valid/test records, the catalog (item id = index) and every user's train+valid item ids."""
  train: tuple[Record, ...]
  valid: tuple[Record, ...]
  test: tuple[Record, ...]
  catalog: tuple[str, ...]
  histories: Mapping[int, tuple[int, ...]]
  user_keys: Mapping[int, str] | None = None

  @functools.cached_property
  def _item_ids(self) -> dict[str, int]:
    return {title: item for item, title in enumerate(self.catalog)}

  def item_id(self, title: str) -> int:
    try:
      return self._item_ids[title]
    except KeyError:
      raise DataError(f"title {title!r} is not in the catalog") from None

  def item_ids(self, titles: Sequence[str]) -> list[int]:
    return [self.item_id(title) for title in titles]

  def split(self, name: str) -> tuple[Record, ...]:
    if name not in SPLITS:
      raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
    return getattr(self, name)

  @functools.cached_property
  def users(self) -> tuple[int, ...]:
    """Every user with a record in any split, ascending."""
    return tuple(sorted({r.user for name in SPLITS for r in self.split(name)}))


def derive_catalog(splits: Mapping[str, Sequence[Record]]) -> tuple[str, ...]:
  """Every title in the records, in order of first appearance (train, valid, test; history first)."""
  seen = {}
  for name in SPLITS:
    for record in splits[name]:
      parts = parse_record(record)
      for title in parts.history + parts.targets:
        seen.setdefault(title, None)
  return tuple(seen)


def derive_histories(splits: Mapping[str, Sequence[Record]],
                     item_id: Mapping[str, int]) -> dict[int, tuple[int, ...]]:
  """Per user: item ids of the inputs and outputs of its train+valid records and the inputs of its
  test records (a test input is the last 10 train+valid items, docs/method.md §6), in order of first appearance.

  Sampled BIGRec files hold only part of each sequence, so this is the best history they allow; test
  outputs are never included.
  """
  histories: dict[int, dict[int, None]] = {}
  for name in SPLITS:
    for record in splits[name]:
      parts = parse_record(record)
      titles = parts.history if name == "test" else parts.history + parts.targets
      items = histories.setdefault(record.user, {})
      for title in titles:
        items.setdefault(item_id[title], None)
  return {user: tuple(items) for user, items in sorted(histories.items())}


def load_dataset(path) -> Dataset:
  """Reads a dataset directory, or a plain BIGRec one (catalog and histories are then derived)."""
  path = Path(path)
  if not path.is_dir():
    raise DataError("dataset directory not found (the Games data: `python tools/fetch_data.py games` writes "
                    "data/games; your own interactions: tools/prepare_data.py, docs/data.md)", file=path)
  splits = {}
  for name in SPLITS:
    file = path / f"{name}.json"
    if not file.exists():
      raise DataError(f"missing split file (a dataset directory needs {', '.join(SPLITS)})", file=file)
    splits[name] = tuple(load_records(file))
  catalog_file = path / CATALOG_FILE
  if catalog_file.exists():
    catalog = _load_catalog(catalog_file)
  else:
    catalog = derive_catalog(splits)
    logger.info("%s: no %s; derived a catalog of %d titles from the records", path, CATALOG_FILE,
                len(catalog))
  item_id = {title: item for item, title in enumerate(catalog)}
  for name in SPLITS:
    _check_titles_in_catalog(path / f"{name}.json", splits[name], item_id)
  histories_file = path / HISTORIES_FILE
  if histories_file.exists():
    histories = _load_histories(histories_file, len(catalog))
  else:
    histories = derive_histories(splits, item_id)
  users_file = path / USERS_FILE
  user_keys = _load_user_keys(users_file) if users_file.exists() else None
  logger.info("%s: %d train, %d valid, %d test records; %d items; %d users", path,
              len(splits["train"]), len(splits["valid"]), len(splits["test"]), len(catalog),
              len(histories))
  return Dataset(splits["train"], splits["valid"], splits["test"], catalog, histories, user_keys)


def save_dataset(path, dataset: Dataset) -> None:
  """Writes the dataset directory format (all files, catalog and histories included)."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  for name in SPLITS:
    save_records(path / f"{name}.json", dataset.split(name))
  _write_json(path / CATALOG_FILE,
              [{"id": item, "title": title} for item, title in enumerate(dataset.catalog)])
  _write_json(path / HISTORIES_FILE, [{"user": user, "items": list(items)}
                                      for user, items in sorted(dataset.histories.items())])
  if dataset.user_keys is not None:
    _write_json(path / USERS_FILE,
                [{"user": user, "key": key} for user, key in sorted(dataset.user_keys.items())])


def _write_json(path: Path, value) -> None:
  files.write_json(path, value, indent=1, ensure_ascii=False)


def _read_json_list(path: Path) -> list:
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as error:
    raise DataError(f"malformed JSON at line {error.lineno} column {error.colno}: {error.msg}",
                    file=path) from None
  if not isinstance(data, list):
    raise DataError("must hold a JSON list", file=path)
  return data


def _check_object(path: Path, index: int, obj, fields: dict[str, type]) -> None:
  if not isinstance(obj, dict):
    raise DataError("must be a JSON object", file=path, index=index)
  for field, kind in fields.items():
    if field not in obj:
      raise DataError("missing field", file=path, index=index, field=field)
    value = obj[field]
    if isinstance(value, bool) or not isinstance(value, kind):
      raise DataError(f"must be {kind.__name__}, got {value!r}", file=path, index=index, field=field)


def _load_catalog(path: Path) -> tuple[str, ...]:
  titles, seen = [], {}
  for index, obj in enumerate(_read_json_list(path)):
    _check_object(path, index, obj, {"id": int, "title": str})
    if obj["id"] != index:
      raise DataError(f"ids must be 0..n-1 in order; expected {index}, got {obj['id']}", file=path,
                      index=index, field="id")
    if not obj["title"]:
      raise DataError("empty title", file=path, index=index, field="title")
    if obj["title"] in seen:
      raise DataError(f"duplicate title (also item {seen[obj['title']]})", file=path, index=index,
                      field="title")
    seen[obj["title"]] = index
    titles.append(obj["title"])
  return tuple(titles)


def _load_histories(path: Path, num_items: int) -> dict[int, tuple[int, ...]]:
  histories = {}
  for index, obj in enumerate(_read_json_list(path)):
    _check_object(path, index, obj, {"user": int, "items": list})
    if obj["user"] in histories:
      raise DataError(f"user {obj['user']} appears twice", file=path, index=index, field="user")
    for item in obj["items"]:
      if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < num_items:
        raise DataError(f"item {item!r} is not a catalog id (0..{num_items - 1})", file=path,
                        index=index, field="items")
    histories[obj["user"]] = tuple(obj["items"])
  return histories


def _load_user_keys(path: Path) -> dict[int, str]:
  keys = {}
  for index, obj in enumerate(_read_json_list(path)):
    _check_object(path, index, obj, {"user": int, "key": str})
    keys[obj["user"]] = obj["key"]
  return keys


def _check_titles_in_catalog(file: Path, records: Sequence[Record], item_id: Mapping[str, int]):
  for index, record in enumerate(records):
    parts = parse_record(record)
    for field, titles in (("input", parts.history), ("output", parts.targets)):
      for title in titles:
        if title not in item_id:
          raise DataError(f"title {title!r} is not in the catalog", file=file, index=index,
                          field=field)
