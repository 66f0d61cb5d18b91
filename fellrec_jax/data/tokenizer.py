"""The run's tokenizer: the user's Hugging Face tokenizer from a local directory, or a small byte-level
BPE trained on the catalog titles and the prompt template, saved with the run (HF format)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fellrec_jax import files
from fellrec_jax.data.dataset import Dataset
from fellrec_jax.data.prompts import full_text
from fellrec_jax.data.records import INPUT_END, DataError, Record, make_record, parse_record

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)  # ids 0..3, Llama's order for unk/bos/eos
FINGERPRINT_FILE = "fellrec_training.json"  # what the saved BPE was trained on

logger = logging.getLogger(__name__)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
  """A byte-level BPE (every string round-trips exactly) with <unk>, <s>, </s>, <pad> at ids 0..3.

  Like Llama's, it adds BOS itself when called with add_special_tokens=True.
  """
  min_size = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
  if vocab_size < min_size:
    raise ValueError(f"vocab_size must be at least {min_size} (specials + 256 bytes), got {vocab_size}")
  model = Tokenizer(models.BPE(unk_token=UNK))
  model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  model.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  model.train_from_iterator(texts, trainer)
  model.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, model.token_to_id(BOS))])
  return PreTrainedTokenizerFast(tokenizer_object=model, unk_token=UNK, bos_token=BOS, eos_token=EOS,
                                 pad_token=PAD, clean_up_tokenization_spaces=False)


def training_texts(dataset: Dataset) -> list[str]:
  """One short example per catalog title (the title as history and as response) for every wording
  of the data, so that merges cover titles, the template and the separators in their real context."""
  wordings = {(p.instruction, p.input_phrase) for p in map(parse_record, _first_records(dataset))}
  texts = []
  for instruction, phrase in sorted(wordings):
    for n, title in enumerate(dataset.catalog):
      neighbour = dataset.catalog[(n + 1) % len(dataset.catalog)]
      record = make_record(instruction, phrase, [neighbour, title], INPUT_END, [title], 0)
      texts.append(full_text(record))
  return texts


def _first_records(dataset: Dataset, limit: int = 1000) -> Sequence[Record]:
  records = [r for name in ("train", "valid", "test") for r in dataset.split(name)[:limit]]
  if not records:
    raise DataError("the dataset has no records to train a tokenizer on")
  return records


def load_or_train_tokenizer(*, tokenizer_path: str, dataset: Dataset, vocab_size: int = 2000,
                            save_dir=None) -> PreTrainedTokenizerFast:
  """The user's tokenizer when `tokenizer_path` names a local HF directory; else the run's saved BPE
  in `save_dir` if there is one (a resumed run); else a new BPE, saved to `save_dir`."""
  if tokenizer_path:
    return load_tokenizer(tokenizer_path)
  texts = training_texts(dataset)
  fingerprint = {"vocab_size": vocab_size,
                 "corpus_sha256": hashlib.sha256("\0".join(texts).encode()).hexdigest()}
  if save_dir is not None and (Path(save_dir) / "tokenizer.json").exists():
    _check_fingerprint(Path(save_dir), fingerprint)
    logger.info("reusing the run's tokenizer in %s", save_dir)
    return load_tokenizer(save_dir)
  tokenizer = train_bpe_tokenizer(texts, vocab_size)
  logger.info("trained a byte-level BPE of %d tokens on %d titles", len(tokenizer), len(dataset.catalog))
  if save_dir is not None:
    tokenizer.save_pretrained(str(save_dir))
    files.write_json(Path(save_dir) / FINGERPRINT_FILE, fingerprint, indent=1)
  return tokenizer


def _check_fingerprint(save_dir: Path, fingerprint: dict) -> None:
  """A resumed run must reuse its own tokenizer, not one trained on other data or settings."""
  file = save_dir / FINGERPRINT_FILE
  saved = json.loads(file.read_text()) if file.exists() else None
  if saved != fingerprint:
    raise DataError("this tokenizer was trained on other data or another vocab_size; use a fresh "
                    "workdir or delete the tokenizer directory", file=save_dir)


def load_tokenizer(path) -> PreTrainedTokenizerFast:
  """A fast HF tokenizer from a local directory (never downloads); a missing pad token becomes id 0."""
  if not Path(path).is_dir():
    raise DataError("tokenizer directory not found", file=path)
  tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
  if not getattr(tokenizer, "is_fast", False):
    raise DataError("need a fast (Rust) tokenizer: offsets locate the response", file=path)
  if tokenizer.pad_token_id is None:
    # As BIGRec does for Llama: pad with id 0 (padding is always masked out).
    tokenizer.pad_token_id = 0
  return tokenizer


def pad_id(tokenizer) -> int:
  return 0 if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)


def titles_not_round_tripping(tokenizer, titles: Sequence[str]) -> list[str]:
  """The titles that do not decode back to themselves exactly (generation could not produce them)."""
  bad = []
  for title in titles:
    ids = tokenizer(title, add_special_tokens=False)["input_ids"]
    if tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) != title:
      bad.append(title)
  return bad

