"""The Alpaca prompt of docs/method.md §1 (one template for training and inference) and its token encoding.

An encoded example is BOS + tokens(prompt + output) + EOS, tokenized in one call as BIGRec does, with a
loss mask: mask[t] = 1 when token t is a label (predicted from position t - 1). Token 0 never is.
"""

from __future__ import annotations

import numpy as np

from fellrec_jax.data.records import DataError, Record, parse_record, with_history

HEADER = ("Below is an instruction that describes a task, paired with an input that provides further "
          "context. Write a response that appropriately completes the request.\n\n")
RESPONSE_MARKER = "### Response:\n"
TEMPLATES = ("clean", "reference")
TRUNCATIONS = ("history", "end")
_INDENT = " " * 16  # the reference training template's indentation (docs/method.md §7)


def prompt_text(record: Record, template: str = "clean") -> str:
  """Everything up to and including "### Response:\\n": the text a model generates from. `reference` is
  the reference's training template, whose whitespace differs (kept only to reproduce its runs)."""
  if template == "reference":
    header = HEADER.replace("request.\n\n", "request. \n\n")
    return (f"{header}{_INDENT}### Instruction:\n{_INDENT}{record.instruction}\n\n{_INDENT}### Input:\n"
            f"{_INDENT}{record.input}\n\n{_INDENT}### Response:\n{_INDENT}")
  return (f"{HEADER}### Instruction:\n{record.instruction}\n\n### Input:\n{record.input}\n\n"
          f"{RESPONSE_MARKER}")


def full_text(record: Record) -> str:
  return prompt_text(record) + record.output


def encode_example(tokenizer, record: Record, *, cutoff_len: int, train_on_inputs: bool, template: str = "clean",
                   truncation: str = "history") -> tuple[np.ndarray, np.ndarray]:
  """(ids int32, loss_mask float32) of the full example in `template`. Over cutoff_len tokens, `history`
  drops the oldest history titles until it fits (the response is always whole); `end` cuts the tokens at
  cutoff_len, as the reference's tokenizer call does, with EOS only when there is room for it."""
  if template not in TEMPLATES or truncation not in TRUNCATIONS:
    raise DataError(f"template must be one of {TEMPLATES} and truncation one of {TRUNCATIONS}, got "
                    f"{template!r} and {truncation!r}")
  encode = lambda r, eos=True: _encode_full(tokenizer, r, train_on_inputs, template, eos)
  if truncation == "end":
    ids, mask = encode(record, eos=False)
    ids, mask = ids[:cutoff_len], mask[:cutoff_len]
    if len(ids) < cutoff_len:
      ids, mask = ids + [_eos(tokenizer)], mask + [1]
  else:
    ids, mask = _fit(encode, record, cutoff_len)
  return np.asarray(ids, np.int32), np.asarray(mask, np.float32)


def encode_prompt(tokenizer, record: Record, *, cutoff_len: int | None = None) -> np.ndarray:
  """Prompt ids for generation: BOS + tokens(prompt_text), no EOS; truncated like training."""
  def encode(r):
    ids = _bos(tokenizer) + _tokenize(tokenizer, prompt_text(r))[0]
    return ids, None
  ids, _ = _fit(encode, record, cutoff_len)
  return np.asarray(ids, np.int32)


def _fit(encode, record: Record, cutoff_len: int | None):
  """encode(record) with the oldest history titles dropped until it has at most cutoff_len tokens."""
  history = parse_record(record).history
  for dropped in range(len(history) + 1):
    candidate = record if dropped == 0 else with_history(record, history[dropped:])
    ids, mask = encode(candidate)
    if cutoff_len is None or len(ids) <= cutoff_len:
      return ids, mask
  raise DataError(f"the example of user {record.user} needs {len(ids)} tokens even with no history, "
                  f"more than cutoff_len={cutoff_len} (raise cutoff_len)")


def _encode_full(tokenizer, record: Record, train_on_inputs: bool, template: str = "clean", eos: bool = True):
  prompt = prompt_text(record, template)
  tokens, offsets = _tokenize(tokenizer, prompt + record.output)
  bos = _bos(tokenizer)
  ids = bos + tokens + ([_eos(tokenizer)] if eos else [])
  if train_on_inputs:
    mask = [0] + [1] * (len(ids) - 1)
  else:
    # A token is a response label when it covers any character of the output (offsets are chars).
    mask = [0] * len(bos) + [int(end > len(prompt)) for _, end in offsets] + ([1] if eos else [])
    mask[0] = 0
  return ids, mask


def _tokenize(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
  encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  return list(encoding["input_ids"]), list(encoding["offset_mapping"])


def _bos(tokenizer) -> list[int]:
  return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _eos(tokenizer) -> int:
  if tokenizer.eos_token_id is None:
    raise DataError("the tokenizer has no EOS token; every example ends with EOS")
  return tokenizer.eos_token_id
