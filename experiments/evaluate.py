"""Evaluate a training run's best adapters per client on its test users (docs/method.md §5).

  python experiments/evaluate.py --workdir=runs/default [--mode=constrained] [--max_test_users=100] [--report]

Writes eval.json, predictions.jsonl, eval_clients.png and rounds.png into the workdir and prints the
metrics (HR, Recall, NDCG, Precision, MRR; @10 and @20 first); --report also prints them as a Markdown
table (overall, popularity, each client). Installed, the same program is `fellrec-evaluate`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fellrec_jax.run import entry  # noqa: E402

if __name__ == "__main__":
  entry.evaluate()
