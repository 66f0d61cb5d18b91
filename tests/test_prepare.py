"""docs/method.md §6 construction on hand-made tables; expected values derived by hand in the comments."""

import gzip
import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from fellrec_jax.data.dataset import load_dataset
from fellrec_jax.data.prepare import (GAMES_INPUT_PHRASE, GAMES_INSTRUCTION, Construction, build_dataset,
                                 prepare_from_amazon, prepare_from_tables, temporal_split)
from fellrec_jax.data.records import INPUT_END, make_record, parse_record

# Interactions in input order (row: user, item, time). Item "X" has no title; "Z" is titled "E" like
# item "E" (one item); (1, A) repeats and keeps its last time (55) and its first position (row 0).
ROWS = [
    (1, "A", 10), (1, "B", 20), (1, "C", 30), (1, "D", 40), (1, "E", 50), (1, "A", 55),  # rows 0-5
    (2, "A", 11), (2, "B", 21), (2, "C", 31), (2, "F", 41),  # rows 6-9
    (3, "B", 12), (3, "C", 22), (3, "D", 60), (3, "E", 60),  # rows 10-13: D, E tie at 60
    (4, "A", 70), (4, "Z", 80),  # rows 14-15
    (5, "G", 5), (5, "X", 6),  # rows 16-17: X has no title
    (2, "D", 90), (4, "C", 90), (6, "F", 95),  # rows 18-20
]
ITEMS = [("A", "A"), ("B", "B"), ("C", "C"), ("D", "D"), ("E", "E"), ("F", "F"), ("G", "G"),
         ("Z", "E"), ("H", ""), ("A", "A duplicate row")]
# Step 1: 21 rows - 1 (X) - 1 (repeat of (1, A)) = 19; user 5: G; user 6: F.
# k-core, k=2: pass 1 drops users 5 and 6 (1 interaction) and item G (1); pass 2 drops (2, F) since F
# is left with 1; pass 3 changes nothing. 16 interactions remain:
#   user 1: B20 C30 D40 E50 A55 | user 2: A11 B21 C31 D90 | user 3: B12 C22 D60 E60 | user 4: A70 E80 C90
# Sorted times: 11 12 20 21 22 30 31 40 50 55 60 60 70 80 90 90; n = int(0.2 * 16) = 3;
# valid cut T[16-6] = T[10] = 60 (both 60s go to valid), test cut T[13] = 80.
#   user 1: train B C D E A | user 2: train A B C, test D | user 3: train B C, valid D E (input order)
#   user 4: valid A, test E C.
# Window 3. Train: user 1 (m=5): targets at 3, 4 -> [B C D]->E, [C D E]->A; user 2 (m=3): [A B]->C;
# user 3 (m=2): [B]->C. Valid: user 3: [B C]->D, [B C D]->E; user 4 has no train items: dropped.
# Test: user 2: [A B C]->D; user 4: [A]->E, C (multi-target, time order).
EXPECTED_TRAIN = [(1, "BCD", "E"), (1, "CDE", "A"), (2, "AB", "C"), (3, "B", "C")]
EXPECTED_VALID = [(3, "BC", "D"), (3, "BCD", "E")]
EXPECTED_TEST = [(2, "ABC", "D"), (4, "A", "EC")]
EXPECTED_HISTORIES = {1: "BCDEA", 2: "ABC", 3: "BCDE", 4: "A"}
TOY = Construction(k_core=2, window=3, split_fraction=0.2)


def _tables():
  interactions = pd.DataFrame(ROWS, columns=["user", "item", "timestamp"])
  items = pd.DataFrame(ITEMS, columns=["item", "title"])
  return interactions, items


def _triples(records):
  return [(r.user, "".join(parse_record(r).history), "".join(parse_record(r).targets))
          for r in records]


def _check_toy(dataset, stats):
  assert dataset.catalog == ("A", "B", "C", "D", "E")
  assert _triples(dataset.train) == EXPECTED_TRAIN
  assert _triples(dataset.valid) == EXPECTED_VALID
  assert _triples(dataset.test) == EXPECTED_TEST
  assert {u: "".join(dataset.catalog[i] for i in items)
          for u, items in dataset.histories.items()} == EXPECTED_HISTORIES
  assert stats["interactions_read"] == 21
  assert stats["duplicate_item_rows_dropped"] == 1
  assert stats["items_without_title"] == 1
  assert stats["items_merged_by_title"] == 1
  assert stats["interactions_without_titled_item"] == 1
  assert stats["repeated_interactions_merged"] == 1
  assert stats["k_core_iterations"] == 2
  assert stats["interactions_after_k_core"] == 16
  assert stats["valid_without_train_items"] == 1
  assert stats["train_targets_without_history"] == 0


def test_toy_tables_give_the_hand_derived_splits():
  dataset, stats = build_dataset(*_tables(), TOY)
  _check_toy(dataset, stats)
  first = dataset.train[0]
  assert first == make_record(GAMES_INSTRUCTION, GAMES_INPUT_PHRASE, ["B", "C", "D"], INPUT_END,
                              ["E"], 1)
  assert first.input == GAMES_INPUT_PHRASE + '"B", "C", "D"\n '


def test_window_ten_default_and_empty_history_count():
  # One user, 12 train items at t=1..12 plus 2+2 later ones for the split (N=16, n=1 with 0.1):
  # targets at positions 10, 11 with the previous 10 items; a second user with 1 train item yields an
  # empty-history target (skipped, counted).
  rows = [(1, f"i{t}", t) for t in range(1, 15)] + [(2, "i1", 0), (2, "i2", 15)]
  items = [(f"i{t}", f"T{t:02d}") for t in range(1, 15)]
  dataset, stats = build_dataset(pd.DataFrame(rows, columns=["user", "item", "timestamp"]),
                                 pd.DataFrame(items, columns=["item", "title"]),
                                 Construction(k_core=1))
  # Times sorted: 0, 1..14, 15 (N=16), n=1: valid cut T[14]=14, test cut T[15]=15.
  # User 1: train i1..i13 (t 1..13), valid i14; user 2: train i1 (t 0), test i2 (t 15).
  train = [t for t in _triples(dataset.train)]
  assert train == [(1, "".join(f"T{t:02d}" for t in range(s, s + 10)), f"T{s + 10:02d}")
                   for s in (1, 2, 3)]
  assert stats["train_targets_without_history"] == 1
  assert _triples(dataset.valid) == [(1, "".join(f"T{t:02d}" for t in range(4, 14)), "T14")]
  assert _triples(dataset.test) == [(2, "T01", "T02")]


def test_temporal_split_ties_go_to_the_later_part():
  times = [1, 2, 3, 3, 3, 4, 5, 5, 6, 7]  # n = 1: cuts T[8] = 6 and T[9] = 7
  assert temporal_split(pd.Series(times).to_numpy(), 0.1).tolist() == [0] * 8 + [1, 2]
  # n = 2: cuts T[6] = 5 and T[8] = 6; both 5s go to valid.
  assert temporal_split(pd.Series(times).to_numpy(), 0.2).tolist() == [0] * 6 + [1, 1, 2, 2]


def _write_toy_csvs(tmp_path, sep=","):
  interactions, items = _tables()
  interactions.columns = ["uid", "iid", "ts"]
  items.columns = ["item_id", "title"]
  ext = "csv" if sep == "," else "tsv"
  interactions.to_csv(tmp_path / f"inter.{ext}", sep=sep, index=False)
  items.to_csv(tmp_path / f"items.{ext}", sep=sep, index=False)
  return tmp_path / f"inter.{ext}", tmp_path / f"items.{ext}"


def test_prepare_from_csv_and_tsv_with_renamed_columns(tmp_path):
  for sep in (",", "\t"):
    inter, items = _write_toy_csvs(tmp_path, sep)
    dataset, stats = prepare_from_tables(inter, items, TOY, user_col="uid", item_col="iid",
                                         time_col="ts")
    _check_toy(dataset, stats)


def test_prepare_from_parquet(tmp_path):
  interactions, items = _tables()
  interactions.columns = ["user_id", "item_id", "timestamp"]
  items.columns = ["item_id", "title"]
  interactions.to_parquet(tmp_path / "inter.parquet")
  items.to_parquet(tmp_path / "items.parquet")
  dataset, stats = prepare_from_tables(tmp_path / "inter.parquet", tmp_path / "items.parquet", TOY)
  _check_toy(dataset, stats)


def test_prepare_data_cli_writes_a_loadable_dataset(tmp_path):
  inter, items = _write_toy_csvs(tmp_path)
  spec = importlib.util.spec_from_file_location(
      "prepare_data", Path(__file__).resolve().parents[1] / "tools/prepare_data.py")
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  movies = "The user has watched the following movies before:"
  code = tool.main(["--interactions", str(inter), "--items", str(items), "--out",
                    str(tmp_path / "out"), "--user_col", "uid", "--item_col", "iid", "--time_col",
                    "ts", "--k_core", "2", "--window", "3", "--split_fraction", "0.2",
                    "--instruction", "Recommend a movie.", "--input_phrase", movies])
  assert code == 0
  dataset = load_dataset(tmp_path / "out")
  assert _triples(dataset.train) == EXPECTED_TRAIN
  assert dataset.train[0].instruction == "Recommend a movie."
  assert dataset.train[0].input.startswith(movies + '"B"')
  assert {u: len(h) for u, h in dataset.histories.items()} == {1: 5, 2: 3, 3: 4, 4: 1}


def write_json_gz(path, lines):
  with gzip.open(path, "wt", encoding="utf-8") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def _review(user, asin, time, name=True, overall=5.0):
  review = {"reviewerID": user, "asin": asin, "unixReviewTime": time, "overall": overall}
  return {**review, "reviewerName": "n"} if name else review


def test_amazon_2018_files(tmp_path):
  write_json_gz(tmp_path / "meta_Toy.json.gz", [
      {"asin": "P1", "title": "Alpha &amp; Omega"}, {"asin": "P2", "title": "Beta"},
      {"asin": "P3", "title": "Gamma"}, {"title": "no asin"}, {"asin": "P4"}])
  write_json_gz(tmp_path / "Toy_5.json.gz", [
      _review("U1", "P1", 100), _review("U1", "P2", 200), _review("U1", "P3", 300),
      _review("U2", "P1", 150), _review("U2", "P2", 250), _review("U2", "P3", 350),
      _review("U3", "P1", 50, name=False), _review("U3", "P4", 60), _review("U3", "P9", 70),
      _review("U3", "P2", 80, overall=-1.0)])
  dataset, stats = prepare_from_amazon(tmp_path / "Toy_5.json.gz", tmp_path / "meta_Toy.json.gz",
                                       Construction(k_core=2, split_fraction=0.2))
  # Kept: U1 P1 P2 P3, U2 P1 P2 P3 (U3: no name, P4 untitled, P9 no metadata, negative rating).
  # N=6, n=1: cuts T[4]=300, T[5]=350. U1: train P1 P2, valid P3; U2: train P1 P2, test P3.
  # Users are strings: numbered in sorted order, U1 -> 0, U2 -> 1.
  assert dataset.catalog == ("Alpha &amp; Omega", "Beta", "Gamma")
  alpha = "Alpha &amp; Omega"
  assert _triples(dataset.train) == [(0, alpha, "Beta"), (1, alpha, "Beta")]
  assert [(r.user, parse_record(r).history, parse_record(r).targets) for r in dataset.valid] == [
      (0, (alpha, "Beta"), ("Gamma",))]
  assert [(r.user, parse_record(r).history) for r in dataset.test] == [(1, (alpha, "Beta"))]
  assert dict(dataset.user_keys) == {0: "U1", 1: "U2"}
  assert (stats["reviews_read"], stats["reviews_without_reviewer_name"],
          stats["reviews_without_metadata"], stats["reviews_negative_rating"]) == (10, 1, 1, 1)
  assert (stats["meta_lines_read"], stats["meta_lines_without_asin"]) == (5, 1)
  assert stats["interactions_without_titled_item"] == 1  # U3's P4


@pytest.mark.parametrize("k", [1, 2])
def test_k_core_result_satisfies_k(k):
  dataset, _ = build_dataset(*_tables(), Construction(k_core=k, window=3, split_fraction=0.2))
  counts = {}
  for items in dataset.histories.values():
    for item in items:
      counts[item] = counts.get(item, 0) + 1
  assert len(dataset.catalog) == len(counts)


def test_user_samples_with_window_crossing_train_and_valid():
  from fellrec_jax.data.prepare import user_sample_titles
  train = list("abcdefghijkl")  # 12 train items
  samples, counts = user_sample_titles(train, ["V", "W"], ["X", "Y"], window=10)
  assert samples["train"] == [(list("abcdefghij"), ["k"]), (list("bcdefghijk"), ["l"])]
  assert samples["valid"] == [(list("cdefghijkl"), ["V"]), (list("defghijkl") + ["V"], ["W"])]
  assert samples["test"] == [(list("efghijkl") + ["V", "W"], ["X", "Y"])]
  assert counts == {"train_targets_without_history": 0, "valid_without_train_items": 0,
                    "test_users_without_history": 0}
  # No train items: valid interactions are dropped (counted); the test still has a valid history.
  samples, counts = user_sample_titles([], ["V"], ["X"], window=10)
  assert samples == {"train": [], "valid": [], "test": [(["V"], ["X"])]}
  assert counts["valid_without_train_items"] == 1
  # Only test items: nothing, counted.
  samples, counts = user_sample_titles([], [], ["X"], window=10)
  assert samples["test"] == [] and counts["test_users_without_history"] == 1
