"""Train and evaluate several aggregators on one config and data; write a markdown table and a plot.

  python experiments/compare.py --config=configs/default.py --workdir=runs/compare \
      --aggregators=fellrec,fedavg,local,centralized

Writes workdir/<aggregator>/ (each a full train.py workdir), workdir/compare.md and workdir/compare.png.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fellrec_jax.run import cli
from fellrec_jax.run import comparison

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file (configs/*.py[:smoke]).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "Output directory.")
_AGGREGATORS = flags.DEFINE_list("aggregators", ["fellrec", "fedavg", "local", "centralized"],
                                 "Aggregators to compare.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  cli.run(cli.join, config.mesh.clients * config.mesh.model)
  logging.set_verbosity(logging.WARNING)
  cli.run(comparison.compare, config, _WORKDIR.value, _AGGREGATORS.value)


if __name__ == "__main__":
  app.run(main)
