"""Train and evaluate several aggregators on one config and data; write a markdown table and a plot.

  python experiments/compare.py --config=configs/default.py --workdir=runs/compare \
      --aggregators=fellrec,fedavg,local,centralized [--seeds=0,1,2,3,4]

Writes workdir/<aggregator>/ (each a full train.py workdir; workdir/seed_<s>/<aggregator>/ with several
seeds), workdir/compare.md (with several seeds: mean, 95% interval and the paired difference from FedAvg;
compare.json), compare.png, compare_val_loss.png and compare_fellrec_mixing.png. Finished runs are not
rerun.
Installed, the same program is `fellrec-compare`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fellrec_jax.run import entry  # noqa: E402

if __name__ == "__main__":
  entry.compare()
