"""Public datasets downloaded, checked and written as dataset directories (`tools/fetch_data.py`).

`games`: the FELLRec authors' Amazon 2018 Video Games records in the BIGRec format, from their public
repository (github.com/jasonchen505/FELLRec, pinned commits): the 1,024-record training subset, and the
5,000 validation records split by user into valid and test (a user's records go to test when
crc32(str(user)) is odd; docs/data.md). Every file's SHA-256 is checked before anything is written; a
mismatch is an error that leaves the files already in place untouched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import urllib.request
import zlib
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from fellrec_jax.data.records import DataError, load_records, save_records

_RAW = "https://raw.githubusercontent.com/jasonchen505/FELLRec"


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  name: str  # the name it is stored under while building
  url: str
  sha256: str


@dataclasses.dataclass(frozen=True)
class Source:
  description: str
  files: tuple[RemoteFile, ...]
  build: Callable[[dict[str, Path], Path], None]  # (downloaded files by name, output directory)


def _build_games(files: dict[str, Path], out: Path) -> None:
  valid, test = [], []
  for record in load_records(files["valid_5000_user.json"]):
    (test if zlib.crc32(str(record.user).encode()) % 2 else valid).append(record)
  save_records(out / "train.json", list(load_records(files["train_1024_user.json"])))
  save_records(out / "valid.json", valid)
  save_records(out / "test.json", test)


SOURCES = {
    "games": Source(
        description="Amazon 2018 Video Games, the FELLRec authors' BIGRec records (1,024 train, 5,000 valid "
                    "split into valid and test)",
        files=(
            RemoteFile("train_1024_user.json",
                       f"{_RAW}/d7122154c50800a16b1249d970112110c3ad0a31/BigRec_PPLR/data/games/train_1024_user.json",
                       "dd8a10ad358a1b37e286a6c313d765dd375546dfbfff712204c20f6e56cba465"),
            RemoteFile("valid_5000_user.json",
                       f"{_RAW}/68570d7dd5d3dea51600aee8e3eb90449efb6039/data/games/valid_5000_user.json",
                       "aef7d174f69f3e026f4af9b7276225573f551b7d5fbfd697868e44019533af39"),
        ),
        build=_build_games),
}
MARKER = "fetched.json"  # written last: a directory without it is not a complete dataset


def fetch(name: str, out_dir, *, force: bool = False, sources: dict[str, Source] = SOURCES,
          timeout_s: float = 60.0) -> Path:
  """Download, check and build dataset `name` into `out_dir` (returned); an existing complete one is kept
  unless `force`. Nothing in `out_dir` changes unless every file downloads and checks."""
  if name not in sources:
    raise DataError(f"unknown dataset {name!r}; available: {', '.join(sorted(sources))}")
  source, out_dir = sources[name], Path(out_dir)
  if (out_dir / MARKER).exists() and not force:
    return out_dir
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
    tmp = Path(tmp)
    files = {f.name: _download(f, tmp / "download" / f.name, timeout_s) for f in source.files}
    build = tmp / "dataset"
    build.mkdir()
    source.build(files, build)
    (build / MARKER).write_text(json.dumps({"dataset": name, "files": {f.name: f.sha256 for f in source.files}},
                                           indent=1) + "\n")
    if out_dir.exists():
      shutil.rmtree(out_dir)
    build.rename(out_dir)
  return out_dir


def _download(remote: RemoteFile, path: Path, timeout_s: float) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  digest = hashlib.sha256()
  try:
    with urllib.request.urlopen(remote.url, timeout=timeout_s) as response, open(path, "wb") as f:
      total = int(response.headers.get("Content-Length") or 0) or None
      with tqdm(total=total, unit="B", unit_scale=True, desc=remote.name, leave=False) as bar:
        while chunk := response.read(1 << 20):
          f.write(chunk)
          digest.update(chunk)
          bar.update(len(chunk))
  except OSError as e:  # URLError, HTTPError, timeouts
    raise DataError(f"could not download {remote.url}: {e}", file=remote.name) from e
  if digest.hexdigest() != remote.sha256:
    raise DataError(f"SHA-256 {digest.hexdigest()} of the download from {remote.url} is not the expected "
                    f"{remote.sha256} (a changed or corrupt file); nothing was written", file=remote.name)
  return path
