"""Seconds per trained sample and peak memory of training rounds as the number of clients grows.

One run per invocation (so that the peak RSS is this run's): the synthetic data with `--clients` users,
one client per user (per_user partition; a 2-core, as the 5-core of 8 users is empty), the default tiny
model with small adapters (LoRA r4 on q_proj and v_proj, so that 10,000 clients' state fits a small
machine), `--per_round` clients per round (0 = all), `--rounds` rounds. Prints one JSON line: the
steady-state round (the fastest after the first, which compiles), its trained samples, seconds per
sample, peak RSS, and the client state's bytes on disk (checkpoint) and in memory.

  python tools/client_scaling.py --clients 1000 --per_round 100 --workdir /tmp/scaling
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import default  # noqa: E402
from fellrec_jax.run import train  # noqa: E402


def config_for(args):
  c = default.get_config()
  c.data.synthetic.num_users = args.clients
  c.data.synthetic.k_core = 2  # the 5-core of 8 users is empty; the same filter at every size
  c.data.partition = "per_user"
  c.fed.num_clients = 0  # one client per user
  c.fed.clients_per_round = args.per_round
  c.fed.rounds = args.rounds
  c.fed.local_epochs = 1
  c.fed.aggregator = args.aggregator
  c.fed.stream_sizes = args.stream_sizes
  c.lora.rank = 4
  c.lora.targets = ("q_proj", "v_proj")
  c.pretrain.steps = 30
  c.pretrain.cache_dir = str(Path(args.workdir) / "base_model")
  c.eval.at_end = False
  c.checkpoint_every = 1000
  return c


def trained_samples(workdir: Path, record: dict, local_epochs: int) -> int:
  """Examples trained in a round (each counted once per local epoch) from its metrics record or arrays."""
  if "clients" in record:
    return local_epochs * sum(c["train_examples"] for c in record["clients"] if c["status"] == "trained")
  arrays = np.load(workdir / "rounds" / f"round_{record['round']:05d}.npz")
  return local_epochs * int(arrays["train_examples"][arrays["status"] == "trained"].sum())


def client_state_bytes(checkpoints: Path) -> int:
  """Bytes of the latest checkpoint's state arrays as held in memory (shape x dtype of each, from the
  checkpoint's metadata): the clients' adapters, best adapters and optimizer state, the server's [C] arrays."""
  step = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  meta = ocp.StandardCheckpointer().metadata(checkpoints / str(step) / "state").item_metadata
  arrays = [m for m in jax.tree.leaves(meta) if getattr(m, "shape", None) is not None]
  return sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in arrays)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--clients", type=int, required=True, help="users of the synthetic data = clients")
  parser.add_argument("--per_round", type=int, default=0, help="fed.clients_per_round (0: all)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--aggregator", default="fellrec")
  parser.add_argument("--stream_sizes", type=int, default=default.get_config().fed.stream_sizes,
                      help="fed.stream_sizes: the budgets streamed steps run at (1: each round's largest)")
  parser.add_argument("--workdir", required=True, help="the base model is cached here; each run in a subfolder")
  args = parser.parse_args()
  config = config_for(args)
  run_dir = Path(args.workdir) / f"c{args.clients}_m{args.per_round}_{args.aggregator}"
  shutil.rmtree(run_dir, ignore_errors=True)
  start = time.perf_counter()
  train.train(config, run_dir)
  total = time.perf_counter() - start
  records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  steady = min(records[1:] or records, key=lambda r: r["seconds"])
  samples = trained_samples(run_dir, steady, config.fed.local_epochs)
  state_bytes = sum(f.stat().st_size for f in (run_dir / "checkpoints").rglob("*") if f.is_file())
  print(json.dumps({
      "clients": len(records[0]["clients"]) if "clients" in records[0] else records[0]["clients_summary"]["count"],
      "per_round": args.per_round, "aggregator": args.aggregator, "stream_sizes": args.stream_sizes,
      "round": steady["round"],
      "round_seconds": steady["seconds"], "trained_samples": samples,
      "seconds_per_sample": steady["seconds"] / max(samples, 1),
      "all_round_seconds": [r["seconds"] for r in records], "total_seconds": round(total, 1),
      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "checkpoint_mib": round(state_bytes / 2**20, 1),
      "client_state_mib": round(client_state_bytes(run_dir / "checkpoints") / 2**20, 1)}))


if __name__ == "__main__":
  main()
