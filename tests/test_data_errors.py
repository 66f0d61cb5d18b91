"""Bad input: each case gives an error naming the file, the record (line, row) and the field."""

import gzip
import json

import numpy as np
import pandas as pd
import pytest

from configs.data import get_data_config
from fellrec_jax.data import batching
from fellrec_jax.data import partition
from fellrec_jax.data import prompts
from fellrec_jax.data import synthetic
from fellrec_jax.data.dataset import load_dataset
from fellrec_jax.data.pipeline import build_federated_data
from fellrec_jax.data.prepare import (Construction, build_dataset, prepare_from_amazon,
                                 prepare_from_tables)
from fellrec_jax.data.records import DataError, format_titles, load_records, make_record
from fellrec_jax.data.tokenizer import train_bpe_tokenizer

GOOD = {"instruction": "Recommend.", "input": 'Seen:"A", "B"\n ', "output": '"C"', "user": 1}


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return path


def _records_file(tmp_path, records):
  return _write(tmp_path / "train.json", json.dumps(records))


def _expect(error_info, *, file=None, index=None, field=None, unit="record", reason=None):
  error = error_info.value
  message = str(error)
  if file is not None:
    assert str(file) in message and error.file == str(file)
  if index is not None:
    assert f"{unit} {index}" in message and error.index == index
  if field is not None:
    assert f"field {field!r}" in message and error.field == field
  if reason is not None:
    assert reason in message


# ---------------------------------------------------------------- BIGRec JSON records


def test_malformed_json(tmp_path):
  path = _write(tmp_path / "train.json", '[{"instruction": "x",\n "input": }]')
  with pytest.raises(DataError) as info:
    load_records(path)
  _expect(info, file=path, reason="malformed JSON at line 2")


def test_top_level_not_a_list(tmp_path):
  path = _records_file(tmp_path, GOOD)
  with pytest.raises(DataError) as info:
    load_records(path)
  _expect(info, file=path, reason="JSON list of records, got object")


def test_record_not_an_object(tmp_path):
  path = _records_file(tmp_path, [GOOD, ["not", "an", "object"]])
  with pytest.raises(DataError) as info:
    load_records(path)
  _expect(info, file=path, index=1, reason="must be a JSON object, got list")


def test_missing_field(tmp_path):
  path = _records_file(tmp_path, [GOOD, GOOD, {k: v for k, v in GOOD.items() if k != "user"}])
  with pytest.raises(DataError) as info:
    load_records(path)
  _expect(info, file=path, index=2, field="user", reason="missing field")


def test_user_of_wrong_type(tmp_path):
  path = _records_file(tmp_path, [{**GOOD, "user": "12"}])
  with pytest.raises(DataError) as info:
    load_records(path)
  _expect(info, file=path, index=0, field="user", reason="must be an integer, got string")


def test_output_of_wrong_type(tmp_path):
  path = _records_file(tmp_path, [GOOD, {**GOOD, "output": 3}])
  with pytest.raises(DataError) as info:
    load_records(path)
  _expect(info, file=path, index=1, field="output", reason="must be a string, got integer")


def test_unbalanced_quotes_in_the_history(tmp_path):
  path = _records_file(tmp_path, [{**GOOD, "input": 'Seen:"A", "B\n '}])
  with pytest.raises(DataError) as info:
    load_records(path)
  _expect(info, file=path, index=0, field="input", reason="text after the last quoted title")


def test_unbalanced_quotes_in_the_output(tmp_path):
  path = _records_file(tmp_path, [{**GOOD, "output": '"Diablo III'}])
  with pytest.raises(DataError) as info:
    load_records(path)
  _expect(info, file=path, index=0, field="output", reason="unbalanced quotes")


def test_empty_output(tmp_path):
  path = _records_file(tmp_path, [GOOD, GOOD, GOOD, {**GOOD, "output": ""}])
  with pytest.raises(DataError) as info:
    load_records(path)
  _expect(info, file=path, index=3, field="output", reason="empty title list")


def test_empty_title_in_a_list(tmp_path):
  path = _records_file(tmp_path, [{**GOOD, "input": 'Seen:"A", "", "B"\n '}])
  with pytest.raises(DataError) as info:
    load_records(path)
  _expect(info, file=path, index=0, field="input", reason="empty title at position 1")


def test_input_without_any_title(tmp_path):
  path = _records_file(tmp_path, [{**GOOD, "input": "Seen: nothing\n "}])
  with pytest.raises(DataError) as info:
    load_records(path)
  _expect(info, file=path, index=0, field="input", reason="no double-quoted history title")


def test_title_that_cannot_be_written():
  with pytest.raises(DataError, match="cannot be written"):
    format_titles(["Fine", 'Broken", "title'])


def test_missing_split_file_and_title_outside_the_catalog(tmp_path):
  _write(tmp_path / "train.json", json.dumps([GOOD]))
  with pytest.raises(DataError) as info:
    load_dataset(tmp_path)
  _expect(info, file=tmp_path / "valid.json", reason="missing split file")
  for name in ("valid", "test"):
    _write(tmp_path / f"{name}.json", json.dumps([GOOD]))
  _write(tmp_path / "items.json", json.dumps([{"id": 0, "title": "A"}, {"id": 1, "title": "B"}]))
  with pytest.raises(DataError) as info:
    load_dataset(tmp_path)
  _expect(info, file=tmp_path / "train.json", index=0, field="output", reason="'C' is not in the catalog")


def test_duplicate_catalog_title(tmp_path):
  for name in ("train", "valid", "test"):
    _write(tmp_path / f"{name}.json", json.dumps([GOOD]))
  _write(tmp_path / "items.json", json.dumps(
      [{"id": 0, "title": "A"}, {"id": 1, "title": "B"}, {"id": 2, "title": "A"}]))
  with pytest.raises(DataError) as info:
    load_dataset(tmp_path)
  _expect(info, file=tmp_path / "items.json", index=2, field="title", reason="duplicate title")


# ---------------------------------------------------------------- tables


def _tables(tmp_path, interactions, items="item_id,title\na,A\nb,B\n"):
  return _write(tmp_path / "inter.csv", interactions), _write(tmp_path / "items.csv", items)


def test_unknown_column(tmp_path):
  inter, items = _tables(tmp_path, "user,item_id,timestamp\n1,a,3\n")
  with pytest.raises(DataError) as info:
    prepare_from_tables(inter, items)
  _expect(info, file=inter, field="user_id", reason="unknown column")


def test_empty_table(tmp_path):
  inter, items = _tables(tmp_path, "user_id,item_id,timestamp\n")
  with pytest.raises(DataError) as info:
    prepare_from_tables(inter, items)
  _expect(info, file=inter, reason="no rows")


def test_non_numeric_timestamp(tmp_path):
  inter, items = _tables(tmp_path, "user_id,item_id,timestamp\n1,a,3\n1,b,2015-01-02\n")
  with pytest.raises(DataError) as info:
    prepare_from_tables(inter, items)
  _expect(info, file=inter, index=1, unit="row", field="timestamp", reason="'2015-01-02' is not a number")


def test_missing_user_value(tmp_path):
  inter, items = _tables(tmp_path, "user_id,item_id,timestamp\n1,a,3\n1,b,4\n,a,5\n")
  with pytest.raises(DataError) as info:
    prepare_from_tables(inter, items)
  _expect(info, file=inter, index=2, unit="row", field="user_id", reason="missing value")


def test_unknown_table_format(tmp_path):
  path = _write(tmp_path / "inter.xlsx", "x")
  with pytest.raises(DataError) as info:
    prepare_from_tables(path, path)
  _expect(info, file=path, reason="unknown table format")


def test_k_core_that_leaves_nothing():
  interactions = pd.DataFrame({"user": [1, 1, 2], "item": ["a", "b", "a"], "timestamp": [1, 2, 3]})
  items = pd.DataFrame({"item": ["a", "b"], "title": ["A", "B"]})
  with pytest.raises(DataError, match="5-core is empty"):
    build_dataset(interactions, items, Construction(k_core=5))


def test_too_few_interactions_to_split():
  interactions = pd.DataFrame({"user": [1, 1, 2, 2], "item": ["a", "b"] * 2, "timestamp": [1, 2, 3, 4]})
  items = pd.DataFrame({"item": ["a", "b"], "title": ["A", "B"]})
  with pytest.raises(DataError, match="too few"):
    build_dataset(interactions, items, Construction(k_core=1))


# ---------------------------------------------------------------- Amazon 2018 files


def _gz(path, lines):
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path


def test_bad_amazon_gz_line(tmp_path):
  meta = _gz(tmp_path / "meta.json.gz", [json.dumps({"asin": "a", "title": "A"})])
  review = json.dumps({"reviewerID": "u", "asin": "a", "unixReviewTime": 1, "overall": 5.0})
  reviews = _gz(tmp_path / "r_5.json.gz", [review, review, "{'reviewerID': 'u'}"])
  with pytest.raises(DataError) as info:
    prepare_from_amazon(reviews, meta)
  _expect(info, file=reviews, index=3, unit="line", reason="malformed JSON")


def test_amazon_review_missing_time(tmp_path):
  meta = _gz(tmp_path / "meta.json.gz", [json.dumps({"asin": "a", "title": "A"})])
  reviews = _gz(tmp_path / "r_5.json.gz", [json.dumps({"reviewerID": "u", "asin": "a", "overall": 1})])
  with pytest.raises(DataError) as info:
    prepare_from_amazon(reviews, meta)
  _expect(info, file=reviews, index=1, unit="line", field="unixReviewTime", reason="missing field")


def test_amazon_file_that_is_not_gzip(tmp_path):
  meta = _write(tmp_path / "meta.json.gz", '{"asin": "a"}\n')
  with pytest.raises(DataError) as info:
    prepare_from_amazon(meta, meta)
  _expect(info, file=meta, reason="cannot read")


# ---------------------------------------------------------------- partitions, prompts, batches


@pytest.fixture(scope="module")
def small_dataset():
  return synthetic.generate({"num_users": 40, "num_series": 10})


def test_more_clients_than_users(small_dataset):
  with pytest.raises(ValueError, match="only 40 users"):
    partition.partition_users(small_dataset, "random", 41, seed=0)


def test_num_clients_below_one(small_dataset):
  with pytest.raises(ValueError, match=r"num_clients must be >= 1 \(0 only with per_user\), got 0"):
    partition.partition_users(small_dataset, "random", 0, seed=0)


def test_unknown_partition(small_dataset):
  with pytest.raises(ValueError, match="unknown partition 'kmeans'"):
    partition.partition_users(small_dataset, "kmeans", 2, seed=0)


def test_per_user_needs_one_client_per_user(small_dataset):
  with pytest.raises(ValueError, match="num_clients = 40"):
    partition.partition_users(small_dataset, "per_user", 5, seed=0)


def test_cutoff_shorter_than_the_prompt():
  record = make_record("Recommend.", "Seen:", ["A", "B"], "\n ", ["C"], 9)
  tokenizer = train_bpe_tokenizer([prompts.full_text(record)], vocab_size=300)
  with pytest.raises(DataError, match="user 9 needs .* tokens even with no history, more than cutoff_len=20"):
    prompts.encode_example(tokenizer, record, cutoff_len=20, train_on_inputs=True)


def test_suffix_longer_than_row_len():
  examples = [[(np.arange(5), np.ones(5))], [(np.arange(9), np.ones(9)), (np.arange(12), np.ones(12))]]
  with pytest.raises(DataError, match="client 1 example 1: its suffix of 10 tokens is longer than row_len=8"):
    batching.make_plan(examples, prefix_len=2, batch_size=2, local_epochs=1, seed=0, num_rounds=1,
                       row_len=8)


def test_client_without_training_examples(tmp_path):
  # User 3 has only a test record: with one client per user, client 2 cannot train.
  records = {"train": [GOOD, {**GOOD, "user": 2}], "valid": [GOOD], "test": [{**GOOD, "user": 3}]}
  for name, split in records.items():
    _write(tmp_path / f"{name}.json", json.dumps(split))
  config = get_data_config()
  config.path = str(tmp_path)
  config.partition = "per_user"
  with pytest.raises(DataError, match=r"clients \[2\] have no training examples under partition 'per_user'"):
    build_federated_data(config, num_clients=3, seed=0, workdir=tmp_path / "run", local_epochs=1,
                         num_rounds=1)
