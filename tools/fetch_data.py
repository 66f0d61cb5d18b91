"""Download a public dataset, check its files' SHA-256 and write it as a dataset directory.

  python tools/fetch_data.py games                   # -> data/games (what configs/games.py reads)
  python tools/fetch_data.py games --out DIR [--force] [--mirror URL]

`--mirror URL` fetches each file as URL/<file name> instead of from its source (a local copy or proxy);
the checksums are the same. A dataset already complete in --out is kept unless --force.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from fellrec_jax.data import fetch  # noqa: E402
from fellrec_jax.data.records import DataError  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("name", choices=sorted(fetch.SOURCES))
  p.add_argument("--out", default="", help="dataset directory (default: data/<name> in the repository)")
  p.add_argument("--force", action="store_true", help="download and rebuild even if --out is complete")
  p.add_argument("--mirror", default="", help="fetch each file as MIRROR/<file name>")
  args = p.parse_args(argv)
  sources = fetch.SOURCES
  if args.mirror:
    source = sources[args.name]
    files = tuple(dataclasses.replace(f, url=f"{args.mirror.rstrip('/')}/{f.name}") for f in source.files)
    sources = {args.name: dataclasses.replace(source, files=files)}
  out = Path(args.out) if args.out else ROOT / "data" / args.name
  try:
    fetch.fetch(args.name, out, force=args.force, sources=sources)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{args.name}: {sources[args.name].description}\nwritten to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
