"""Federated fine-tuning of an LLM recommender (FELLRec and baselines) from a config file.

  python experiments/train.py --config=configs/default.py [--workdir=runs/default] [--config.fed.rounds=3]

Writes to the workdir: metrics.jsonl (one line per round), checkpoints/, summary.json, adapters/ (best
PEFT adapters per client), eval.json and plots (when evaluation runs), train.log. Re-running the same
command resumes from the last checkpoint. The same command runs as one process of a multi-process job
(docs/cluster.md): see --coordinator, --num_processes, --process_id, or tools/launch/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fellrec_jax.run import cli
from fellrec_jax.run import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file (configs/*.py[:smoke]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; default runs/<config name>.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  cli.run(cli.join, config.mesh.clients * config.mesh.model)
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO through absl
  config_path = flags.FLAGS["config"].config_filename
  workdir = _WORKDIR.value or str(Path("runs") / Path(config_path.split(":")[0]).stem)
  cli.run(train.train, config, workdir)


if __name__ == "__main__":
  app.run(main)
