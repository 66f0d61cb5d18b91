"""Train and evaluate several aggregators on one config and data; write a markdown table and a plot.

  python experiments/compare.py --config=configs/default.py --workdir=runs/compare \
      --aggregators=fellrec,fedavg,local,centralized

Writes workdir/<aggregator>/ (each a full train.py workdir), workdir/compare.md and workdir/compare.png.
Installed, the same program is `fellrec-compare`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fellrec_jax.run import entry  # noqa: E402

if __name__ == "__main__":
  entry.compare()
