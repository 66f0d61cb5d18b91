"""Federated fine-tuning of an LLM recommender (FELLRec and baselines) from a config file.

  python experiments/train.py --config=configs/default.py [--workdir=runs/default] [--config.fed.rounds=3]

Writes to the workdir: metrics.jsonl (one line per round), checkpoints/, summary.json, adapters/ (best
PEFT adapters per client), eval.json and plots (when evaluation runs), train.log. Re-running the same
command resumes from the last checkpoint. The same command runs as one process of a multi-process job
(docs/cluster.md): see --coordinator, --num_processes, --process_id, or tools/launch/. Installed, the
same program is `fellrec-train` (fellrec_jax/run/entry.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fellrec_jax.run import entry  # noqa: E402

if __name__ == "__main__":
  entry.train()
