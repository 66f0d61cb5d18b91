"""BIGRec records: JSON objects {"instruction", "input", "output", "user"} and their quoted title lists.

A record's `input` is `<phrase>"Title 1", "Title 2", ...<end>` (the reference writes end = "\\n ") and its
`output` is a title list too (one title, or several for a multi-target test record). Titles are kept
byte-exact: HTML entities, quotes, apostrophes, commas, double and leading spaces are all part of a title.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

from fellrec_jax import files

TITLE_SEPARATOR = '", "'
INPUT_END = "\n "
FIELDS = ("instruction", "input", "output", "user")

logger = logging.getLogger(__name__)


class DataError(ValueError):
  """Malformed input data; the message names the file, the record (or line, row) and the field."""

  def __init__(self, message: str, *, file=None, index: int | None = None, field: str | None = None,
               unit: str = "record"):
    self.file = None if file is None else str(file)
    self.index = index
    self.field = field
    self.reason = message
    where = []
    if self.file is not None:
      where.append(self.file)
    if index is not None:
      where.append(f"{unit} {index}")
    if field is not None:
      where.append(f"field {field!r}")
    super().__init__(f"{', '.join(where)}: {message}" if where else message)


@dataclasses.dataclass(frozen=True)
class Record:
  """One BIGRec sample: the prompt's instruction and input, the response (quoted titles) and the user."""
  instruction: str
  input: str
  output: str
  user: int


class RecordParts(NamedTuple):
  """A record with its title lists parsed; `make_record(*parts)` rebuilds the exact record."""
  instruction: str
  input_phrase: str
  history: tuple[str, ...]
  input_end: str
  targets: tuple[str, ...]
  user: int


def parse_titles(text: str) -> list[str]:
  """Parses `"A", "B"` into ["A", "B"]; a title may hold quotes and commas but not the separator `", "`."""
  if not isinstance(text, str):
    raise DataError(f"a title list must be a string, got {type(text).__name__}")
  if not text:
    raise DataError("empty title list (expected at least one double-quoted title)")
  if text[0] != '"':
    raise DataError(f"a title list must start with a double quote: {_clip(text)!r}")
  if len(text) < 2 or text[-1] != '"':
    raise DataError(f"unbalanced quotes: a title list must end with a double quote: {_clip(text)!r}")
  titles = text[1:-1].split(TITLE_SEPARATOR)
  for position, title in enumerate(titles):
    if not title:
      raise DataError(f"empty title at position {position} of {_clip(text)!r}")
  return titles


def format_titles(titles: Sequence[str]) -> str:
  """Writes titles as `"A", "B"`; raises if the result would not parse back to the same titles."""
  if isinstance(titles, str):
    raise DataError("format_titles takes a list of titles, not a string")
  titles = list(titles)
  if not titles:
    raise DataError("cannot write an empty title list")
  for title in titles:
    if not isinstance(title, str) or not title:
      raise DataError(f"a title must be a non-empty string, got {title!r}")
  text = '"' + TITLE_SEPARATOR.join(titles) + '"'
  if text[1:-1].split(TITLE_SEPARATOR) != titles:
    bad = next(t for n, t in enumerate(titles, 1)
               if TITLE_SEPARATOR.join(titles[:n]).split(TITLE_SEPARATOR) != titles[:n])
    raise DataError(f"title {bad!r} cannot be written in a BIGRec title list: with its neighbours it "
                    f"forms the separator {TITLE_SEPARATOR!r}")
  return text


def render_input(input_phrase: str, history: Sequence[str], input_end: str = INPUT_END) -> str:
  """The record's `input` text; an empty history renders as the phrase alone (used by truncation)."""
  titles = format_titles(history) if len(history) else ""
  return f"{input_phrase}{titles}{input_end}"


def make_record(instruction: str, input_phrase: str, history: Sequence[str], input_end: str,
                targets: Sequence[str], user: int) -> Record:
  """Builds a record from its parts (the inverse of `parse_record`)."""
  if '"' in input_phrase:
    raise DataError(f"the input phrase may not contain a double quote: {input_phrase!r}")
  if input_end.strip():
    raise DataError(f"the input must end in whitespace only after the last title, got {input_end!r}")
  return Record(instruction, render_input(input_phrase, history, input_end), format_titles(targets),
                user)


def parse_record(record: Record) -> RecordParts:
  """Splits a record into instruction, input phrase, history titles, input ending and target titles."""
  text = record.input
  first, last = text.find('"'), text.rfind('"')
  if first < 0:
    raise DataError(f"the input holds no double-quoted history title: {_clip(text)!r}", field="input")
  if text[last + 1:].strip():
    raise DataError(f"text after the last quoted title: {_clip(text[last + 1:])!r}", field="input")
  try:
    history = parse_titles(text[first:last + 1])
  except DataError as error:
    raise DataError(error.reason, field="input") from None
  try:
    targets = parse_titles(record.output)
  except DataError as error:
    raise DataError(error.reason, field="output") from None
  return RecordParts(record.instruction, text[:first], tuple(history), text[last + 1:], tuple(targets),
                     record.user)


def with_history(record: Record, history: Sequence[str]) -> Record:
  """The same record with another history (truncation drops the oldest titles)."""
  parts = parse_record(record)
  return dataclasses.replace(record, input=render_input(parts.input_phrase, history, parts.input_end))


def record_from_json(obj, *, file=None, index: int | None = None) -> Record:
  """Validates one JSON object; errors name the file, the record index and the field."""
  if not isinstance(obj, dict):
    raise DataError(f"a record must be a JSON object, got {_json_type(obj)}", file=file, index=index)
  for field in FIELDS:
    if field not in obj:
      raise DataError("missing field", file=file, index=index, field=field)
  for field in ("instruction", "input", "output"):
    if not isinstance(obj[field], str):
      raise DataError(f"must be a string, got {_json_type(obj[field])}", file=file, index=index,
                      field=field)
  user = obj["user"]
  if isinstance(user, bool) or not isinstance(user, int):
    raise DataError(f"must be an integer, got {_json_type(user)} {user!r}", file=file, index=index,
                    field="user")
  if not obj["instruction"].strip():
    raise DataError("empty instruction", file=file, index=index, field="instruction")
  record = Record(obj["instruction"], obj["input"], obj["output"], user)
  try:
    parse_record(record)
  except DataError as error:
    raise DataError(error.reason, file=file, index=index, field=error.field) from None
  return record


def load_records(path) -> list[Record]:
  """Reads a BIGRec JSON file (a list of records), validating every record and its title lists."""
  path = Path(path)
  try:
    text = path.read_text(encoding="utf-8")
  except FileNotFoundError:
    raise DataError("file not found", file=path) from None
  except UnicodeDecodeError as error:
    raise DataError(f"not UTF-8 text ({error.reason} at byte {error.start})", file=path) from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as error:
    raise DataError(f"malformed JSON at line {error.lineno} column {error.colno}: {error.msg}",
                    file=path) from None
  if not isinstance(data, list):
    raise DataError(f"a BIGRec file must hold a JSON list of records, got {_json_type(data)}", file=path)
  records = [record_from_json(obj, file=path, index=i) for i, obj in enumerate(data)]
  extra = sorted({key for obj in data for key in obj if key not in FIELDS})
  if extra:
    logger.warning("%s: fields %s are not part of a record and are ignored", path, extra)
  return records


def records_to_json(records: Iterable[Record]) -> list[dict]:
  return [dataclasses.asdict(record) for record in records]


def save_records(path, records: Iterable[Record]) -> None:
  """Writes records as the reference does (a JSON list, indent 4), keeping non-ASCII text as is."""
  files.write_json(path, records_to_json(records), indent=4, ensure_ascii=False)


def _clip(text: str, limit: int = 80) -> str:
  return text if len(text) <= limit else text[:limit] + "..."


def _json_type(value) -> str:
  names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "integer",
           float: "number", type(None): "null"}
  return names.get(type(value), type(value).__name__)
