"""From the `data` config to per-client batches: the one entry point the federated engine calls.

build_federated_data: load (or generate) the dataset -> sample train/valid if asked -> load or train
the tokenizer (saved in workdir/tokenizer) -> partition users into clients (prints the table) ->
encode every train/valid record -> shared prefix -> batch plans for training and validation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from fellrec_jax.data import batching
from fellrec_jax.data import partition
from fellrec_jax.data import prompts
from fellrec_jax.data import synthetic
from fellrec_jax.data.dataset import Dataset, load_dataset, save_dataset
from fellrec_jax.data.records import DataError, Record, parse_record
from fellrec_jax.data.tokenizer import load_or_train_tokenizer, pad_id, titles_not_round_tripping

logger = logging.getLogger(__name__)
PROGRESS_MIN_RECORDS = 1000  # below this, encoding takes well under a second: no bar


class TestCase(NamedTuple):
  """One test record, ready for generation and grounding."""
  user: int
  prompt_ids: np.ndarray  # int32, BOS + prompt up to "### Response:\n"
  target_item_ids: tuple[int, ...]  # ground truth (several for a multi-target record)
  history_item_ids: tuple[int, ...]  # the user's train+valid items, masked out of the ranking


class FederatedData:
  """The data side of a federated run: dataset, tokenizer, clients, and their batches."""

  def __init__(self, *, dataset: Dataset, tokenizer, client_of_user: dict[int, int], num_clients: int,
               prefix_ids: np.ndarray, prefix_loss_mask: np.ndarray, train_plan: batching.BatchPlan,
               valid_plan: batching.BatchPlan, cutoff_len: int):
    self.dataset = dataset
    self.tokenizer = tokenizer
    self.client_of_user = client_of_user
    self.num_clients = num_clients
    self.prefix_ids = prefix_ids
    self.prefix_loss_mask = prefix_loss_mask
    self.train_plan = train_plan
    self.valid_plan = valid_plan
    self.cutoff_len = cutoff_len
    self._test_records = records_by_client(dataset.test, client_of_user, num_clients)
    self._test_cases: dict[int, list[TestCase]] = {}

  @property
  def pad_id(self) -> int:
    return self.train_plan.pad_id

  @property
  def vocab_size(self) -> int:
    return len(self.tokenizer)

  @property
  def num_train_examples(self) -> np.ndarray:
    """int32 [C] training examples per client."""
    return self.train_plan.num_examples

  @property
  def num_valid_examples(self) -> np.ndarray:
    return self.valid_plan.num_examples

  def round_batches(self, round_index: int, clients: Sequence[int] | None = None):
    return batching.round_batches(self.train_plan, round_index, clients)

  def valid_batches(self, clients: Sequence[int] | None = None):
    return batching.eval_batches(self.valid_plan, clients)

  def test_cases(self, client: int) -> list[TestCase]:
    if client not in self._test_cases:
      self._test_cases[client] = [self._test_case(r) for r in self._test_records[client]]
    return self._test_cases[client]

  def _test_case(self, record: Record) -> TestCase:
    parts = parse_record(record)
    history = self.dataset.histories.get(record.user) or tuple(self.dataset.item_ids(parts.history))
    return TestCase(record.user,
                    prompts.encode_prompt(self.tokenizer, record, cutoff_len=self.cutoff_len),
                    tuple(self.dataset.item_ids(parts.targets)), tuple(history))


def build_federated_data(data_config, *, num_clients: int, seed: int, workdir, local_epochs: int,
                         rows_multiple: int = 1, num_rounds: int = 100) -> FederatedData:
  """Everything the engine needs; batches are planned for rounds 0..num_rounds-1."""
  workdir = Path(workdir)
  dataset = _load_or_generate(data_config, workdir)
  client_of_user = partition.partition_users(
      dataset, data_config.partition, num_clients, seed, mf_dim=data_config.mf_dim,
      mf_steps=data_config.mf_steps, mf_learning_rate=data_config.mf_learning_rate,
      mf_l2=data_config.mf_l2, kmeans_iters=data_config.kmeans_iters,
      dirichlet_alpha=data_config.dirichlet_alpha, num_item_groups=data_config.num_item_groups)
  num_clients = max(client_of_user.values()) + 1
  dataset = sample_records(dataset, data_config.max_train_samples, data_config.max_valid_samples, seed)
  print(f"clients ({data_config.partition}, seed {seed}):\n"
        + partition.partition_table(dataset, client_of_user))
  tokenizer = load_or_train_tokenizer(tokenizer_path=data_config.tokenizer_path, dataset=dataset,
                                      vocab_size=data_config.vocab_size,
                                      save_dir=workdir / "tokenizer")
  lossy = titles_not_round_tripping(tokenizer, dataset.catalog)
  if lossy:
    logger.warning("%d of %d titles do not decode back exactly with this tokenizer, e.g. %r",
                   len(lossy), len(dataset.catalog), lossy[0])
  encode = dict(cutoff_len=data_config.cutoff_len, train_on_inputs=data_config.train_on_inputs,
                template=data_config.get("train_template", "clean"), truncation=data_config.get("truncation", "history"))
  train = encode_by_client(tokenizer, dataset.train, client_of_user, num_clients, "train", **encode)
  valid = encode_by_client(tokenizer, dataset.valid, client_of_user, num_clients, "valid", **encode)
  _check_every_client_trains(train, data_config.partition)
  prefix_ids, prefix_loss_mask = batching.shared_prefix(
      [e for examples in train + valid for e in examples], data_config.share_prefix)
  prefix_len = len(prefix_ids)
  row_len = data_config.row_len or batching.auto_row_len(
      batching.suffix_lengths(train + valid, prefix_len))
  pad = pad_id(tokenizer)
  train_plan = batching.make_plan(train, prefix_len=prefix_len, batch_size=data_config.batch_size,
                                  local_epochs=local_epochs, seed=seed, num_rounds=num_rounds,
                                  row_len=row_len, rows_multiple=rows_multiple, pad_id=pad)
  valid_plan = batching.make_eval_plan(valid, prefix_len=prefix_len,
                                       batch_size=data_config.eval_batch_size or data_config.batch_size,
                                       row_len=row_len, rows_multiple=rows_multiple, pad_id=pad)
  logger.info("prefix P=%d, row_len T=%d; train S=%d R=%d; valid S=%d R=%d", prefix_len, row_len,
              train_plan.steps, train_plan.rows_per_step, valid_plan.steps, valid_plan.rows_per_step)
  return FederatedData(dataset=dataset, tokenizer=tokenizer, client_of_user=client_of_user,
                       num_clients=num_clients, prefix_ids=prefix_ids,
                       prefix_loss_mask=prefix_loss_mask, train_plan=train_plan,
                       valid_plan=valid_plan, cutoff_len=data_config.cutoff_len)


def _load_or_generate(data_config, workdir: Path) -> Dataset:
  if data_config.path:
    return load_dataset(data_config.path)
  dataset = synthetic.generate(data_config.synthetic)
  if not (workdir / "dataset").exists():  # what the run trained on (written once), for inspection and reuse
    save_dataset(workdir / "dataset", dataset)
  return dataset


def sample_records(dataset: Dataset, max_train: int, max_valid: int, seed: int) -> Dataset:
  """At most max_train/max_valid records (0 = all), a seeded random subset kept in file order, as
  the reference's 1,024-train / 5,000-valid samples."""
  rng = np.random.default_rng([seed % 2**32, 7])
  train = _sample(dataset.train, max_train, rng, "train")
  valid = _sample(dataset.valid, max_valid, rng, "valid")
  return Dataset(train, valid, dataset.test, dataset.catalog, dataset.histories, dataset.user_keys)


def _sample(records: tuple[Record, ...], limit: int, rng, name: str) -> tuple[Record, ...]:
  if not limit or len(records) <= limit:
    return records
  keep = np.sort(rng.choice(len(records), size=limit, replace=False))
  logger.info("max_%s_samples: using %d of %d %s records", name, limit, len(records), name)
  return tuple(records[i] for i in keep)


def records_by_client(records: Sequence[Record], client_of_user: dict[int, int],
                      num_clients: int) -> list[list[Record]]:
  grouped = [[] for _ in range(num_clients)]
  for record in records:
    grouped[client_of_user[record.user]].append(record)
  return grouped


def encode_by_client(tokenizer, records: Sequence[Record], client_of_user: dict[int, int],
                     num_clients: int, split: str, *, cutoff_len: int, train_on_inputs: bool,
                     template: str = "clean", truncation: str = "history") -> list[list[batching.Example]]:
  """Per client, the encoded examples of its records (in file order)."""
  encoded = [[] for _ in range(num_clients)]
  progress = tqdm(records, desc=f"tokenizing {split}", unit="rec",
                  disable=len(records) < PROGRESS_MIN_RECORDS)
  for index, record in enumerate(progress):
    try:
      example = prompts.encode_example(tokenizer, record, cutoff_len=cutoff_len,
                                       train_on_inputs=train_on_inputs, template=template, truncation=truncation)
    except DataError as error:
      raise DataError(error.reason, file=f"{split} split", index=index) from None
    encoded[client_of_user[record.user]].append(example)
  return encoded


def _check_every_client_trains(train: list[list], method: str) -> None:
  empty = [client for client, examples in enumerate(train) if not examples]
  if empty:
    raise DataError(f"clients {empty} have no training examples under partition {method!r} "
                    f"({len(train)} clients): use fewer clients, another partition, or a larger "
                    "max_train_samples")
