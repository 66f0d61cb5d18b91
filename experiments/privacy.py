"""What the server learns at the split: attacks at every split point, and defences beside recommendation
accuracy (docs/privacy.md).

  python experiments/privacy.py --config=configs/default.py --workdir=runs/privacy [--config.fed.rounds=2]

Trains (or reuses) one run per defence setting in <workdir>/<setting> and writes privacy.json,
privacy.md and privacy_by_layer.png into the workdir.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from absl import app, flags, logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fellrec_jax.privacy import report  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file (configs/*.py[:smoke]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (one run per defence setting inside).",
                               required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)
  report.privacy_report(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
