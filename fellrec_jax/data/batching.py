"""Per-client packed batches for the vmapped engine, with static shapes for the whole run.

Contract (docs/data.md, "Batches"):
- Every example starts with the same tokens (header, instruction, input phrase): that shared prefix
  (`prefix_ids` [P], `prefix_loss_mask` [P]) is computed once; each example keeps >= 1 token after it.
- The rest of each example (its suffix) is packed into rows of T tokens, first-fit-decreasing over
  the `batch_size` examples of one optimizer step; R rows per step.
- Per round a client runs `local_epochs` epochs, each a fresh shuffle seeded by (seed, round, client,
  epoch); the last step of an epoch may hold fewer examples. S = max over clients of its steps.
- R is the most rows any step of any planned round needs (found by simulating the shuffles on
  lengths only), rounded up to `rows_multiple`; so shapes never change and round r depends only on
  (seed, r).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import numpy as np
from tqdm import tqdm

from fellrec_jax.data.records import DataError

Example = tuple[np.ndarray, np.ndarray]  # (ids int32 [L], loss_mask float32 [L])
PROGRESS_MIN_CLIENTS = 200  # packing or validating fewer clients takes seconds at most: no progress bar


class RoundBatches(NamedTuple):
  """One round (or one evaluation pass) of packed batches for C clients."""
  tokens: np.ndarray  # int32 [C,S,R,T] suffix tokens, pad id where empty
  positions: np.ndarray  # int32 [C,S,R,T] position in the full example (P + offset), 0 on padding
  segment_ids: np.ndarray  # int32 [C,S,R,T] 1..n for the examples of a row, 0 on padding
  loss_mask: np.ndarray  # float32 [C,S,R,T] 1 where the token is a label
  step_mask: np.ndarray  # bool [C,S], False for steps beyond a client's data
  num_examples: np.ndarray  # int32 [C,S] examples in each step


class Suffixes:
  """One client's example suffixes (the tokens after the shared prefix) in two flat arrays: `suffixes[i]`
  is example i's (ids int32, loss_mask float32), views into them. Two small arrays per example would cost
  more in object overhead than in tokens (at 10,000 clients, ~65,000 examples), and views of the encoded
  examples would keep each whole example, its prefix included, alive for the run."""

  def __init__(self, examples: Sequence[Example], prefix_len: int, client: int):
    for index, (ids, _) in enumerate(examples):
      if len(ids) <= prefix_len:
        raise DataError(f"client {client} example {index} has {len(ids)} tokens, not more than the "
                        f"shared prefix ({prefix_len})")
    tails = [(ids[prefix_len:], mask[prefix_len:]) for ids, mask in examples]
    self.ids = np.concatenate([np.zeros(0, np.int32)] + [ids for ids, _ in tails]).astype(np.int32, copy=False)
    self.loss_mask = np.concatenate([np.zeros(0, np.float32)] + [m for _, m in tails]).astype(np.float32, copy=False)
    self.offsets = np.cumsum([0] + [len(ids) for ids, _ in tails], dtype=np.int64)

  @property
  def lengths(self) -> np.ndarray:
    """int64 [n]: each example's suffix length."""
    return np.diff(self.offsets)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, index: int) -> Example:
    start, end = self.offsets[index], self.offsets[index + 1]
    return self.ids[start:end], self.loss_mask[start:end]

  def __iter__(self):
    return (self[i] for i in range(len(self)))


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """Everything needed to produce any round's batches: suffixes per client and the static shapes."""
  suffixes: tuple[Suffixes, ...]  # [client][example], tokens after the shared prefix
  prefix_len: int  # P
  batch_size: int  # examples per optimizer step
  local_epochs: int
  seed: int
  shuffle: bool  # False for evaluation: one pass in the given order
  num_rounds: int  # rounds the plan covers (R was computed over all of them)
  row_len: int  # T
  rows_per_step: int  # R
  steps: int  # S
  pad_id: int

  @property
  def num_clients(self) -> int:
    return len(self.suffixes)

  @property
  def num_examples(self) -> np.ndarray:
    """int32 [C]: examples per client (per epoch)."""
    return np.asarray([len(s) for s in self.suffixes], np.int32)

  @property
  def client_steps(self) -> np.ndarray:
    """int32 [C]: steps each client really runs per round."""
    steps = [self.local_epochs * math.ceil(len(s) / self.batch_size) for s in self.suffixes]
    return np.asarray(steps, np.int32)


def shared_prefix(examples: Sequence[Example], enabled: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """The longest common prefix (of ids and of loss masks) over all examples, leaving each example at
  least one token; empty when disabled or when there are no examples."""
  if not enabled or not examples:
    return np.zeros(0, np.int32), np.zeros(0, np.float32)
  first_ids, first_mask = examples[0]
  length = min(len(ids) for ids, _ in examples) - 1
  for ids, mask in examples:
    same = (ids[:length] == first_ids[:length]) & (mask[:length] == first_mask[:length])
    if not same.all():
      length = int(np.argmin(same))
  return np.asarray(first_ids[:length], np.int32), np.asarray(first_mask[:length], np.float32)


def auto_row_len(lengths: Sequence[int], multiple: int = 16) -> int:
  """The longest suffix rounded up to a multiple of 16."""
  longest = max(lengths, default=1)
  return max(multiple, math.ceil(longest / multiple) * multiple)


def suffix_lengths(client_examples: Sequence[Sequence[Example]], prefix_len: int) -> list[int]:
  return [len(ids) - prefix_len for examples in client_examples for ids, _ in examples]


def make_plan(client_examples: Sequence[Sequence[Example]], *, prefix_len: int, batch_size: int,
              local_epochs: int, seed: int, num_rounds: int, row_len: int = 0,
              rows_multiple: int = 1, pad_id: int = 0, shuffle: bool = True) -> BatchPlan:
  """The plan for `num_rounds` rounds: suffixes, S, and R from simulating every round's packing."""
  _check_positive(batch_size=batch_size, local_epochs=local_epochs, num_rounds=num_rounds,
                  rows_multiple=rows_multiple)
  suffixes = tuple(Suffixes(examples, prefix_len, c) for c, examples in enumerate(client_examples))
  lengths = [s.lengths for s in suffixes]
  row_len = row_len or auto_row_len([int(n) for ls in lengths for n in ls])
  _check_fits(lengths, row_len)
  steps = max((local_epochs * math.ceil(len(ls) / batch_size) for ls in lengths), default=0)
  plan = BatchPlan(suffixes, prefix_len, batch_size, local_epochs, seed % 2**32, shuffle, num_rounds,
                   row_len, 0, steps, pad_id)
  rows = int(client_rows(plan).max(initial=1))
  return dataclasses.replace(plan, rows_per_step=math.ceil(max(rows, 1) / rows_multiple) * rows_multiple)


def make_eval_plan(client_examples: Sequence[Sequence[Example]], *, prefix_len: int, batch_size: int,
                   row_len: int, rows_multiple: int = 1, pad_id: int = 0) -> BatchPlan:
  """One unshuffled pass (for validation loss): the same packing, 1 epoch, fixed order."""
  return make_plan(client_examples, prefix_len=prefix_len, batch_size=batch_size, local_epochs=1,
                   seed=0, num_rounds=1, row_len=row_len, rows_multiple=rows_multiple,
                   pad_id=pad_id, shuffle=False)


def client_rows(plan: BatchPlan) -> np.ndarray:
  """int [C]: the most rows any step of each client needs over the planned rounds (from the suffixes'
  lengths only, no tokens packed)."""
  rows = np.zeros(plan.num_clients, np.int64)
  for client, suffixes in enumerate(plan.suffixes):
    lengths = suffixes.lengths
    # Without shuffling, or with one step per epoch, every round packs the same steps: one round tells all.
    rounds = range(plan.num_rounds) if plan.shuffle and len(lengths) > plan.batch_size else range(1)
    for round_index in rounds:
      for indices in step_indices(plan, round_index, client):
        rows[client] = max(rows[client], len(first_fit_decreasing(lengths[indices], plan.row_len)))
  return rows


def step_indices(plan: BatchPlan, round_index: int, client: int) -> list[np.ndarray]:
  """The example indices of each step of a client's round, epoch after epoch."""
  count = len(plan.suffixes[client])
  steps = []
  for epoch in range(plan.local_epochs):
    if plan.shuffle:
      order = np.random.default_rng([plan.seed, round_index, client, epoch]).permutation(count)
    else:
      order = np.arange(count)
    steps += [order[start:start + plan.batch_size] for start in range(0, count, plan.batch_size)]
  return steps


def first_fit_decreasing(lengths: Sequence[int], row_len: int) -> list[list[int]]:
  """Rows of indices into `lengths`: longest first (ties by index), each into the first row it fits."""
  rows, space = [], []
  for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
    size = int(lengths[index])
    for row, free in enumerate(space):
      if size <= free:
        rows[row].append(index)
        space[row] -= size
        break
    else:
      rows.append([index])
      space.append(row_len - size)
  return rows


def round_batches(plan: BatchPlan, round_index: int,
                  clients: Sequence[int] | None = None) -> RoundBatches:
  """The packed batches of one round for all clients, or for `clients` only (bounded memory)."""
  if plan.shuffle and not 0 <= round_index < plan.num_rounds:
    raise ValueError(f"round {round_index} is outside the plan's rounds 0..{plan.num_rounds - 1}; "
                     "build the plan with a larger num_rounds")
  clients = range(plan.num_clients) if clients is None else list(clients)
  for client in clients:
    if not 0 <= client < plan.num_clients:
      raise ValueError(f"client {client} does not exist (0..{plan.num_clients - 1})")
  shape = (len(clients), plan.steps, plan.rows_per_step, plan.row_len)
  batches = RoundBatches(
      tokens=np.full(shape, plan.pad_id, np.int32), positions=np.zeros(shape, np.int32),
      segment_ids=np.zeros(shape, np.int32), loss_mask=np.zeros(shape, np.float32),
      step_mask=np.zeros(shape[:2], bool), num_examples=np.zeros(shape[:2], np.int32))
  progress = tqdm(clients, desc=f"packing round {round_index}", unit="client", leave=False,
                  disable=len(clients) < PROGRESS_MIN_CLIENTS)
  for slot, client in enumerate(progress):
    for step, indices in enumerate(step_indices(plan, round_index, client)):
      _pack_step(plan, batches, slot, step, [plan.suffixes[client][i] for i in indices])
  return batches


def eval_batches(plan: BatchPlan, clients: Sequence[int] | None = None) -> RoundBatches:
  """The batches of an evaluation plan (`make_eval_plan`): one pass, no shuffle."""
  if plan.shuffle:
    raise ValueError("eval_batches needs an unshuffled plan (make_eval_plan)")
  return round_batches(plan, 0, clients)


def _pack_step(plan: BatchPlan, batches: RoundBatches, slot: int, step: int,
               examples: list[Example]) -> None:
  rows = first_fit_decreasing([len(ids) for ids, _ in examples], plan.row_len)
  if len(rows) > plan.rows_per_step:  # cannot happen for planned rounds; guards the contract
    raise AssertionError(f"step needs {len(rows)} rows, the plan has {plan.rows_per_step}")
  batches.step_mask[slot, step] = True
  batches.num_examples[slot, step] = len(examples)
  for row, members in enumerate(rows):
    offset = 0
    for segment, index in enumerate(members, start=1):
      ids, mask = examples[index]
      span = slice(offset, offset + len(ids))
      batches.tokens[slot, step, row, span] = ids
      batches.positions[slot, step, row, span] = plan.prefix_len + np.arange(len(ids))
      batches.segment_ids[slot, step, row, span] = segment
      batches.loss_mask[slot, step, row, span] = mask
      offset += len(ids)


def unpack(batches: RoundBatches, prefix_ids: np.ndarray,
           prefix_loss_mask: np.ndarray) -> list[list[Example]]:
  """Per client, the full examples (prefix + segment) in packing order: the inverse of packing."""
  unpacked = []
  for client in range(batches.tokens.shape[0]):
    examples = []
    for step in np.flatnonzero(batches.step_mask[client]):
      for row in range(batches.tokens.shape[2]):
        segments = batches.segment_ids[client, step, row]
        for segment in range(1, int(segments.max()) + 1):
          where = segments == segment
          examples.append((
              np.concatenate([prefix_ids, batches.tokens[client, step, row][where]]).astype(np.int32),
              np.concatenate([prefix_loss_mask,
                              batches.loss_mask[client, step, row][where]]).astype(np.float32)))
    unpacked.append(examples)
  return unpacked


def _check_fits(lengths: Sequence[np.ndarray], row_len: int) -> None:
  for client, client_lengths in enumerate(lengths):
    too_long = np.flatnonzero(client_lengths > row_len)
    if len(too_long):
      index = int(too_long[0])
      raise DataError(f"client {client} example {index}: its suffix of {client_lengths[index]} tokens "
                      f"is longer than row_len={row_len} (raise row_len, or 0 for automatic)")


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
