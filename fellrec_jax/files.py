"""Crash-safe files of a run: atomic writes, flushed appends, and named fault points.

Every JSON (and text) output of a run goes through `write_json` / `write_text`: the content is written to a
temporary file in the same directory, flushed to disk (fsync), then renamed over the destination
(`os.replace`, atomic on POSIX file systems), so a reader or a crash sees the old file or the new one, never
half of one. `atomic_path` gives the same guarantee to writers that take a path (safetensors).
`append_line` adds one line to a JSON-lines file and flushes it to disk before returning.

Fault points: `fault_point(stage)` marks a place where a crash is worth testing (after a metrics line, before
and after a checkpoint save, after eval.json, ...). Normally it does nothing; with the environment variable
FELLREC_FAULT_AT=<stage> (or <stage>#<n>: the n-th time the stage is reached) the process exits at once with
os._exit(FAULT_EXIT_CODE), as a kill -9 would stop it: no clean-up, no flush of Python buffers.
tests/test_crash_safety.py kills runs this way and checks that their reruns end as an uninterrupted run.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger("fellrec_jax")

FAULT_ENV = "FELLREC_FAULT_AT"
FAULT_EXIT_CODE = 86
TEMP_MARK = ".tmp-"  # in the name of a temporary file that is not yet renamed into place

_reached: collections.Counter = collections.Counter()


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
  """A temporary path in `path`'s directory to write to; on success it is fsynced and renamed to `path`.

  On an error the temporary file is removed and the destination is untouched.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}{TEMP_MARK}{secrets.token_hex(4)}"
  os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the usual permissions (umask)
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    fault_point(f"before_rename:{path.name}")
    os.replace(tmp, path)
  except Exception:
    tmp.unlink(missing_ok=True)
    raise
  _fsync_directory(path.parent)


def write_text(path, text: str) -> None:
  """Write `text` (UTF-8) to `path` atomically."""
  with atomic_path(path) as tmp:
    tmp.write_text(text, encoding="utf-8")


def write_json(path, value: Any, indent: int | None = 2, **dumps_kwargs) -> None:
  """Write `value` as JSON to `path` atomically (a trailing newline)."""
  write_text(path, json.dumps(value, indent=indent, **dumps_kwargs) + "\n")


def append_line(path, line: str) -> None:
  """Append one line to a text file and flush it to disk before returning."""
  with open(path, "a", encoding="utf-8") as f:
    f.write(line.rstrip("\n") + "\n")
    f.flush()
    os.fsync(f.fileno())


class TornFileError(ValueError):
  """A JSON-lines file with a malformed line that is not its last (a crash tears only the last)."""


def filter_jsonl(path, keep) -> int:
  """Rewrite a JSON-lines file (atomically) with the records for which `keep(record)` holds; returns how
  many are kept. A malformed last line, left by a crash in the middle of an append, is dropped with a
  warning; a malformed line before it raises TornFileError naming the file and the line.
  """
  path = Path(path)
  lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append((line, json.loads(line)))
    except json.JSONDecodeError as error:
      if any(rest.strip() for rest in lines[number:]):
        raise TornFileError(f"{path}: line {number} is not valid JSON ({error.msg}); only a last line torn by "
                            "a crash is repaired") from None
      logger.warning("%s: line %d is incomplete (written when the run stopped): removed", path, number)
  kept = [line for line, record in records if keep(record)]
  write_text(path, "".join(line + "\n" for line in kept))
  return len(kept)


def _fsync_directory(directory: Path) -> None:
  """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def remove_temporaries(directory) -> list[Path]:
  """Delete the temporary files interrupted atomic writes left under `directory`; returns their paths."""
  stale = [p for p in Path(directory).rglob(f".*{TEMP_MARK}*") if p.is_file()]
  for p in stale:
    p.unlink(missing_ok=True)
  return stale


def fault_point(stage: str) -> None:
  """Exit the process here when FELLREC_FAULT_AT names this stage (and this is its n-th arrival)."""
  spec = os.environ.get(FAULT_ENV)
  if not spec:
    return
  name, _, nth = spec.partition("#")
  if name != stage:
    return
  _reached[stage] += 1
  if _reached[stage] == int(nth or 1):
    crash(stage)


def crash(stage: str) -> None:
  """Stop the process at once, as kill -9 would."""
  del stage
  os._exit(FAULT_EXIT_CODE)
