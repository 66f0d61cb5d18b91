"""Packed batches: lossless, exact masks, static shapes, deterministic rounds; the pipeline end to end."""

import math
from collections import Counter

import numpy as np
import pytest

from configs.data import get_data_config
from fellrec_jax.data import batching
from fellrec_jax.data.pipeline import build_federated_data
from fellrec_jax.data.records import DataError
from fellrec_jax.data.prompts import encode_example

PAD = 3
PREFIX = [1, 7, 7]  # every toy example starts with these ids


def _example(suffix, prefix_mask=(0, 1, 1)):
  ids = np.asarray(PREFIX + list(suffix), np.int32)
  mask = np.asarray(list(prefix_mask) + [float(t % 2) for t in suffix], np.float32)  # odd ids label
  return ids, mask


def _clients():
  """Client 0: 7 examples of 1..6 suffix tokens; client 1: 2 examples; client 2: none."""
  lengths = [[3, 1, 6, 2, 5, 4, 3], [2, 6], []]
  return [[_example(range(10 + 10 * c + i, 10 + 10 * c + i + n)) for i, n in enumerate(ls)]
          for c, ls in enumerate(lengths)]


def _key(example):
  return tuple(example[0].tolist()), tuple(example[1].tolist())


def _plan(**kw):
  args = dict(prefix_len=3, batch_size=3, local_epochs=2, seed=5, num_rounds=4, row_len=8,
              pad_id=PAD)
  return batching.make_plan(_clients(), **{**args, **kw})


def test_shared_prefix_by_hand():
  a = (np.array([1, 5, 6, 7, 8]), np.array([0, 1, 1, 1, 1.0]))
  b = (np.array([1, 5, 6, 9]), np.array([0, 1, 1, 1.0]))
  c = (np.array([1, 5, 6, 7]), np.array([0, 1, 1, 0.0]))
  ids, mask = batching.shared_prefix([a, b, c])
  assert ids.tolist() == [1, 5, 6] and mask.tolist() == [0, 1, 1]
  assert ids.dtype == np.int32 and mask.dtype == np.float32
  # Identical examples: the prefix leaves one token to each.
  assert batching.shared_prefix([c, c])[0].tolist() == [1, 5, 6]
  # Same ids, different loss masks: the prefix stops where the masks differ.
  d = (np.array([1, 5, 6, 7]), np.array([0, 1, 0, 1.0]))
  assert batching.shared_prefix([c, d])[0].tolist() == [1, 5]
  assert len(batching.shared_prefix([a, b], enabled=False)[0]) == 0


def test_plan_holds_its_suffixes_not_the_encoded_examples():
  """A plan keeps copies of the suffixes after the prefix, each client's in two flat arrays: a view would
  keep every whole encoded example (its prefix included) alive for the run, which at 10,000 clients is
  ~100 MiB, and two arrays per example cost more in overhead than in tokens."""
  clients = _clients()
  plan = batching.make_plan(clients, prefix_len=3, batch_size=3, local_epochs=1, seed=0, num_rounds=1, row_len=8)
  for encoded, suffixes in zip(clients, plan.suffixes):
    assert len(suffixes) == len(encoded)
    np.testing.assert_array_equal(suffixes.lengths, [len(ids) - 3 for ids, _ in encoded])
    for (ids, mask), (suffix_ids, suffix_mask) in zip(encoded, suffixes):
      np.testing.assert_array_equal(suffix_ids, ids[3:])
      np.testing.assert_array_equal(suffix_mask, mask[3:])
      assert suffix_ids.dtype == np.int32 and suffix_mask.dtype == np.float32
      assert not np.shares_memory(suffix_ids, ids) and not np.shares_memory(suffix_mask, mask)
      assert np.shares_memory(suffix_ids, suffixes.ids) and np.shares_memory(suffix_mask, suffixes.loss_mask)


def test_first_fit_decreasing_by_hand():
  # Sorted: 6 (i4), 5 (i0), 4 (i2), 3 (i1), 2 (i3) into rows of 8:
  # 6 -> row 0 (2 left); 5 -> row 1 (3 left); 4 -> row 2; 3 -> row 1 (0 left); 2 -> row 0.
  assert batching.first_fit_decreasing([5, 3, 4, 2, 6], 8) == [[4, 3], [0, 1], [2]]


def test_shapes_steps_and_step_mask():
  plan = _plan()
  batches = batching.round_batches(plan, 0)
  # S = max(2 * ceil(7/3), 2 * ceil(2/3), 0) = 6.
  assert plan.steps == 6
  assert batches.tokens.shape == (3, 6, plan.rows_per_step, 8)
  assert batches.step_mask.tolist() == [[True] * 6, [True, True] + [False] * 4, [False] * 6]
  assert batches.num_examples.tolist() == [[3, 3, 1, 3, 3, 1], [2, 2, 0, 0, 0, 0], [0] * 6]
  assert plan.client_steps.tolist() == [6, 2, 0]
  assert plan.num_examples.tolist() == [7, 2, 0]
  for field, dtype in zip(batches._fields, [np.int32, np.int32, np.int32, np.float32, bool, np.int32]):
    assert getattr(batches, field).dtype == dtype, field


def test_unpacking_gives_back_every_example_once_per_epoch():
  plan = _plan()
  prefix_ids, prefix_mask = np.asarray(PREFIX, np.int32), np.asarray([0, 1, 1], np.float32)
  for round_index in range(plan.num_rounds):
    unpacked = batching.unpack(batching.round_batches(plan, round_index), prefix_ids, prefix_mask)
    for client, examples in enumerate(_clients()):
      n = len(examples)
      assert len(unpacked[client]) == n * plan.local_epochs
      for epoch in range(plan.local_epochs):
        got = Counter(_key(e) for e in unpacked[client][epoch * n:(epoch + 1) * n])
        assert got == Counter(_key(e) for e in examples)


def test_masks_positions_and_padding_are_exact():
  plan = _plan()
  b = batching.round_batches(plan, 1)
  pad = b.segment_ids == 0
  assert (b.tokens[pad] == PAD).all() and (b.positions[pad] == 0).all()
  assert (b.loss_mask[pad] == 0).all()
  assert not b.segment_ids[~b.step_mask].any()
  for c, s, r in zip(*np.nonzero(b.segment_ids.max(axis=-1))):
    row = b.segment_ids[c, s, r]
    for segment in range(1, row.max() + 1):
      where = np.flatnonzero(row == segment)
      assert (np.diff(where) == 1).all()  # contiguous
      # Positions continue the prefix: P, P+1, ...; labels are exactly the odd toy ids.
      assert b.positions[c, s, r, where].tolist() == list(range(3, 3 + len(where)))
      assert b.loss_mask[c, s, r, where].tolist() == [float(t % 2) for t in b.tokens[c, s, r, where]]
    # Segments are numbered 1..n from the row start, padding only after the last one.
    used = row > 0
    assert used[:used.sum()].all()


def test_first_token_of_a_segment_may_be_a_label_only_with_a_prefix():
  plan = _plan()
  b = batching.round_batches(plan, 0)
  starts = (b.segment_ids > 0) & (b.positions == 3)
  assert b.loss_mask[starts].max() == 1.0  # toy suffixes start with odd and even ids
  no_prefix = batching.make_plan(_clients(), prefix_len=0, batch_size=3, local_epochs=1, seed=0,
                                 num_rounds=1, row_len=16, pad_id=PAD)
  b0 = batching.round_batches(no_prefix, 0)
  first = (b0.segment_ids > 0) & (b0.positions == 0)
  assert first.sum() == 9 and b0.loss_mask[first].max() == 0.0


def test_rounds_are_deterministic_and_seeded_per_round_client_epoch():
  plan = _plan()
  one = batching.round_batches(plan, 2)
  assert all(np.array_equal(x, y) for x, y in zip(one, batching.round_batches(plan, 2)))
  steps = batching.step_indices(plan, 2, 0)
  order = np.random.default_rng([5, 2, 0, 1]).permutation(7)  # seed, round, client, epoch
  assert np.concatenate(steps[3:]).tolist() == order.tolist()
  orders = {tuple(np.concatenate(batching.step_indices(plan, r, 0)).tolist()) for r in range(4)}
  assert len(orders) > 1


def test_rows_per_step_covers_every_planned_round_and_is_tight():
  plan = _plan()
  lengths = [np.array([len(ids) - 3 for ids, _ in examples]) for examples in _clients()]
  needed = max(len(batching.first_fit_decreasing(lengths[c][idx], 8))
               for r in range(plan.num_rounds) for c in range(3)
               for idx in batching.step_indices(plan, r, c))
  assert plan.rows_per_step == needed
  assert _plan(rows_multiple=4).rows_per_step == 4 * math.ceil(needed / 4)


def test_client_subset_matches_the_full_round():
  plan = _plan()
  full = batching.round_batches(plan, 3)
  part = batching.round_batches(plan, 3, clients=[1, 2])
  assert all(np.array_equal(x[1:], y) for x, y in zip(full, part))
  with pytest.raises(ValueError, match="outside the plan"):
    batching.round_batches(plan, 4)


def test_eval_batches_one_pass_in_order():
  plan = batching.make_eval_plan(_clients(), prefix_len=3, batch_size=3, row_len=8, pad_id=PAD)
  b = batching.eval_batches(plan)
  assert b.num_examples.tolist() == [[3, 3, 1], [2, 0, 0], [0, 0, 0]]
  unpacked = batching.unpack(b, np.asarray(PREFIX), np.asarray([0, 1, 1.0]))
  examples = _clients()[0]
  assert Counter(_key(e) for e in unpacked[0][:3]) == Counter(_key(e) for e in examples[:3])
  assert Counter(_key(e) for e in unpacked[0][6:]) == Counter([_key(examples[6])])


def test_auto_row_len():
  assert batching.auto_row_len([3, 17, 5]) == 32
  assert batching.auto_row_len([16]) == 16
  assert _plan(row_len=0).row_len == 16


@pytest.fixture(scope="module")
def federated(tmp_path_factory):
  config = get_data_config()
  config.synthetic.num_users = 60
  config.synthetic.num_series = 12
  config.partition = "random"
  config.batch_size = 8
  workdir = tmp_path_factory.mktemp("run")
  fd = build_federated_data(config, num_clients=3, seed=0, local_epochs=2, rows_multiple=2,
                            workdir=workdir, num_rounds=3)
  assert (workdir / "tokenizer/tokenizer.json").exists() and (workdir / "dataset/items.json").exists()
  return fd


def test_pipeline_batches_unpack_to_the_encoded_records(federated):
  fd = federated
  assert len(fd.prefix_ids) > 20 and fd.prefix_loss_mask[0] == 0
  assert fd.train_plan.rows_per_step % 2 == 0
  config = get_data_config()
  unpacked = batching.unpack(fd.round_batches(1), fd.prefix_ids, fd.prefix_loss_mask)
  for client in range(fd.num_clients):
    records = [r for r in fd.dataset.train if fd.client_of_user[r.user] == client]
    expected = Counter(_key(encode_example(fd.tokenizer, r, cutoff_len=config.cutoff_len,
                                           train_on_inputs=True)) for r in records)
    n = len(records)
    assert fd.num_train_examples[client] == n
    assert Counter(map(_key, unpacked[client][:n])) == expected
    assert Counter(map(_key, unpacked[client][n:])) == expected
  valid = fd.valid_batches()
  assert valid.num_examples.sum(axis=1).tolist() == fd.num_valid_examples.tolist()


def test_pipeline_test_cases(federated):
  fd = federated
  cases = [case for client in range(fd.num_clients) for case in fd.test_cases(client)]
  assert len(cases) == len(fd.dataset.test)
  for case in cases[:5]:
    assert case.prompt_ids[0] == fd.tokenizer.bos_token_id
    assert fd.tokenizer.decode(case.prompt_ids[1:]).endswith("### Response:\n")
    assert set(case.target_item_ids).isdisjoint(case.history_item_ids)
    assert case.history_item_ids == fd.dataset.histories[case.user]


def test_an_example_no_longer_than_the_prefix_is_a_clear_error():
  clients = [[_example([5, 6])], [_example([7]), (np.asarray(PREFIX, np.int32), np.zeros(3, np.float32))]]
  with pytest.raises(DataError, match=r"client 1 example 1 has 3 tokens, not more than the shared prefix \(3\)"):
    batching.make_plan(clients, prefix_len=3, batch_size=2, local_epochs=1, seed=0, num_rounds=1, row_len=8)
