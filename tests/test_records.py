"""Records and the dataset directory format, on hand-made records and on ../shared/data/games_bigrec."""

import json
from pathlib import Path

import pytest

from fellrec_jax.data.dataset import Dataset, load_dataset, save_dataset
from fellrec_jax.data.records import (DataError, Record, format_titles, load_records, make_record,
                                 parse_record, parse_titles, save_records, with_history)

GAMES = Path(__file__).resolve().parents[1].parent / "shared/data/games_bigrec"
needs_games = pytest.mark.skipif(not (GAMES / "train.json").exists(),
                                 reason=f"reference data not found at {GAMES}")

INSTRUCTION = "Recommend a game."
PHRASE = "The user has played the following video games before:"
TRICKY = ['Ivan "Ironman" Stewart\'s Super Off Road', "Might &amp; Magic, Heroes", "  Two  spaces",
          "Pok&eacute;mon: X, Y", 'Ends with a quote "Q"']


def test_parse_titles_keeps_quotes_commas_entities_and_spaces():
  text = ('"Ivan "Ironman" Stewart\'s Super Off Road", "Might &amp; Magic, Heroes", "  Two  spaces", '
          '"Pok&eacute;mon: X, Y", "Ends with a quote "Q""')
  assert parse_titles(text) == TRICKY
  assert format_titles(TRICKY) == text


def test_parse_titles_single_title():
  assert parse_titles('"Diablo III"') == ["Diablo III"]


def test_format_titles_refuses_a_title_holding_the_separator():
  with pytest.raises(DataError, match="separator"):
    format_titles(["A", 'B", "C'])


def test_record_parts_round_trip():
  record = Record(INSTRUCTION, f'{PHRASE}"{TRICKY[0]}", "{TRICKY[1]}"\n ', '"X", "Y"', 7)
  parts = parse_record(record)
  assert parts.input_phrase == PHRASE
  assert parts.history == tuple(TRICKY[:2])
  assert parts.input_end == "\n "
  assert parts.targets == ("X", "Y")
  assert make_record(*parts) == record


def test_with_history_rerenders_the_input():
  record = make_record(INSTRUCTION, PHRASE, ["A", "B", "C"], "\n ", ["D"], 1)
  shorter = with_history(record, ["B", "C"])
  assert shorter.input == f'{PHRASE}"B", "C"\n '
  assert shorter.output == record.output
  assert with_history(record, []).input == f"{PHRASE}\n "


def test_save_and_load_records(tmp_path):
  records = [make_record(INSTRUCTION, PHRASE, TRICKY[:3], "\n ", [TRICKY[3]], 1),
             make_record(INSTRUCTION, PHRASE, ["é ü 日本"], "\n ", ["A", "B"], 2)]
  save_records(tmp_path / "x.json", records)
  assert load_records(tmp_path / "x.json") == records
  assert json.loads((tmp_path / "x.json").read_text())[1]["input"] == f'{PHRASE}"é ü 日本"\n '


def _toy_dir(tmp_path):
  tmp_path.mkdir(parents=True, exist_ok=True)
  records = {
      "train": [make_record(INSTRUCTION, PHRASE, ["A", "B"], "\n ", ["C"], 1),
                make_record(INSTRUCTION, PHRASE, ["B"], "\n ", ["D"], 2)],
      "valid": [make_record(INSTRUCTION, PHRASE, ["A", "B", "C"], "\n ", ["E"], 1)],
      "test": [make_record(INSTRUCTION, PHRASE, ["D", "F"], "\n ", ["G"], 3)],
  }
  for name, split in records.items():
    save_records(tmp_path / f"{name}.json", split)
  return records


def test_plain_bigrec_dir_derives_catalog_and_histories(tmp_path):
  _toy_dir(tmp_path)
  dataset = load_dataset(tmp_path)
  # First appearance: train (history then target), valid, test.
  assert dataset.catalog == ("A", "B", "C", "D", "E", "F", "G")
  # Train/valid inputs and outputs; test inputs only (G is user 3's test target).
  assert dict(dataset.histories) == {1: (0, 1, 2, 4), 2: (1, 3), 3: (3, 5)}
  assert dataset.users == (1, 2, 3)
  assert dataset.item_id("E") == 4


def test_save_dataset_round_trip(tmp_path):
  _toy_dir(tmp_path / "in")
  dataset = load_dataset(tmp_path / "in")
  save_dataset(tmp_path / "out", dataset)
  again = load_dataset(tmp_path / "out")
  assert again == Dataset(dataset.train, dataset.valid, dataset.test, dataset.catalog,
                          dataset.histories)
  assert json.loads((tmp_path / "out/items.json").read_text())[1] == {"id": 1, "title": "B"}


@needs_games
def test_games_bigrec_counts_from_its_readme():
  dataset = load_dataset(GAMES)
  counts = {name: (len(dataset.split(name)), len({r.user for r in dataset.split(name)}))
            for name in ("train", "valid", "test")}
  assert counts == {"train": (1024, 918), "valid": (2500, 1877), "test": (2500, 1861)}


@needs_games
def test_games_bigrec_titles_in_catalog_and_round_trip():
  dataset = load_dataset(GAMES)
  raw_titles = set()
  for name in ("train", "valid", "test"):
    raw = json.loads((GAMES / f"{name}.json").read_text())
    for obj, record in zip(raw, dataset.split(name), strict=True):
      parts = parse_record(record)
      assert make_record(*parts) == record
      assert parse_record(make_record(*parts)) == parts
      assert Record(**obj) == record
      for title in parts.history + parts.targets:
        assert dataset.catalog[dataset.item_id(title)] == title
      # An independent reading: strip the phrase and the trailing "\n ", split on '", "'.
      assert obj["input"].startswith(PHRASE + '"') and obj["input"].endswith('"\n ')
      raw_titles.update(obj["input"][len(PHRASE) + 1:-3].split('", "'))
      raw_titles.update(obj["output"][1:-1].split('", "'))
  assert set(dataset.catalog) == raw_titles
  assert len(dataset.catalog) == len(raw_titles)
  tricky = [t for t in dataset.catalog if '"' in t or "&amp;" in t or "  " in t or t.startswith(" ")]
  assert len(tricky) > 100  # the data really exercises quotes, entities and spacing
