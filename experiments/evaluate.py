"""Evaluate a training run's best adapters per client on its test users (docs/method.md §5).

  python experiments/evaluate.py --workdir=runs/default [--mode=constrained] [--max_test_users=100]

Writes eval.json, predictions.jsonl, eval_clients.png and rounds.png into the workdir.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from absl import app, flags, logging  # noqa: E402

from fellrec_jax.run import cli
from fellrec_jax.run import distributed
from fellrec_jax.run import evaluate as evaluation

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a train.py run.", required=True)
_MODE = flags.DEFINE_enum("mode", None, list(evaluation.EVAL_MODES), "Ranking mode (default: the run's config).")
_MAX_USERS = flags.DEFINE_integer("max_test_users", None, "Test cases per client (0 = all).")
_BEAMS = flags.DEFINE_integer("num_beams", None, "Beam width.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Generated tokens.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = evaluation.load_config(_WORKDIR.value)
  cli.run(cli.join, config.mesh.clients * config.mesh.model)
  logging.set_verbosity(logging.WARNING)
  report = cli.run(evaluation.evaluate_workdir, _WORKDIR.value, mode=_MODE.value, max_test_users=_MAX_USERS.value,
                   num_beams=_BEAMS.value, max_new_tokens=_MAX_NEW.value)
  if not distributed.is_main():
    return
  print(json.dumps({"overall": report["overall"],
                    "popularity": report["baselines"]["popularity"]["overall"]}, indent=2))


if __name__ == "__main__":
  app.run(main)
