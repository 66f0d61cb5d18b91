"""tools/fetch_data.py against a local HTTP server: checked downloads, a corrupt file that deletes nothing,
the Games data rebuilt exactly, and the games command's message when its data is absent."""

import dataclasses
import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fellrec_jax.data import fetch
from fellrec_jax.data.dataset import load_dataset
from fellrec_jax.data.records import INPUT_END, DataError, load_records, make_record, save_records

ROOT = Path(__file__).resolve().parents[1]
GAMES = ROOT.parent / "shared/data/games_bigrec"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


@pytest.fixture
def server(tmp_path):
  """(served directory, base URL) of an HTTP server on the loopback."""
  served = tmp_path / "served"
  served.mkdir()
  handler = functools.partial(QuietHandler, directory=str(served))
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
  httpd.shutdown()


def sha256(path):
  return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tiny_source(served, url):
  """A two-file source: a split file served as is, and one whose records the build splits in two."""
  titles = ["Alpha", "Beta", "Gamma", "Delta"]
  records = [make_record("Recommend.", "Seen:", titles[:2], INPUT_END, [titles[2 + u % 2]], u) for u in range(6)]
  save_records(served / "a.json", records[:2])
  save_records(served / "b.json", records[2:])

  def build(files, out):
    save_records(out / "train.json", load_records(files["a.json"]))
    rest = load_records(files["b.json"])
    save_records(out / "valid.json", rest[:2])
    save_records(out / "test.json", rest[2:])

  files = tuple(fetch.RemoteFile(n, f"{url}/{n}", sha256(served / n)) for n in ("a.json", "b.json"))
  return {"tiny": fetch.Source("tiny", files, build)}, records


def test_fetch_downloads_checks_and_builds_a_dataset(server, tmp_path):
  served, url = server
  sources, records = tiny_source(served, url)
  out = fetch.fetch("tiny", tmp_path / "data" / "tiny", sources=sources)
  dataset = load_dataset(out)
  assert list(dataset.train) == records[:2] and list(dataset.valid) == records[2:4]
  assert list(dataset.test) == records[4:]
  marker = json.loads((out / fetch.MARKER).read_text())
  assert marker["files"] == {f.name: f.sha256 for f in sources["tiny"].files}
  assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # no temporary leftovers


def test_a_corrupt_download_is_an_error_that_keeps_the_good_dataset(server, tmp_path):
  served, url = server
  sources, _ = tiny_source(served, url)
  out = fetch.fetch("tiny", tmp_path / "data" / "tiny", sources=sources)
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  (served / "b.json").write_text((served / "b.json").read_text().replace("Gamma", "Gamma!"))  # changed upstream
  with pytest.raises(DataError, match=r"b\.json.*SHA-256 .* is not the expected"):
    fetch.fetch("tiny", out, sources=sources, force=True)
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before
  assert [p.name for p in out.parent.iterdir()] == ["tiny"]
  missing = {"tiny": dataclasses.replace(sources["tiny"], files=(
      dataclasses.replace(sources["tiny"].files[0], url=f"{url}/absent.json"),))}
  with pytest.raises(DataError, match="could not download .*absent.json"):
    fetch.fetch("tiny", tmp_path / "data" / "other", sources=missing)
  assert not (tmp_path / "data" / "other").exists()


def test_a_complete_dataset_is_kept_unless_forced(server, tmp_path):
  served, url = server
  sources, _ = tiny_source(served, url)
  out = fetch.fetch("tiny", tmp_path / "tiny", sources=sources)
  (served / "a.json").unlink()  # a second fetch would fail: it must not download at all
  assert fetch.fetch("tiny", out, sources=sources) == out
  with pytest.raises(DataError):
    fetch.fetch("tiny", out, sources=sources, force=True)


@pytest.mark.skipif(not GAMES.exists(), reason="../shared/data/games_bigrec is not present")
def test_the_games_tool_rebuilds_the_reference_records_from_its_checked_files(server, tmp_path):
  served, url = server
  for name in ("train_1024_user.json", "valid_5000_user.json"):
    (served / name).write_bytes((GAMES / "original" / name).read_bytes())
  out = tmp_path / "games"
  run = subprocess.run([sys.executable, "tools/fetch_data.py", "games", f"--out={out}", f"--mirror={url}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  for split in ("train", "valid", "test"):
    assert load_records(out / f"{split}.json") == load_records(GAMES / f"{split}.json"), split


def test_the_games_command_without_its_data_says_how_to_fetch_it(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = subprocess.run([sys.executable, "experiments/train.py", "--config=configs/games.py:smoke",
                        f"--workdir={tmp_path / 'run'}", f"--config.data.path={tmp_path / 'data' / 'games'}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 1
  assert "python tools/fetch_data.py games" in run.stderr and "Traceback" not in run.stderr
