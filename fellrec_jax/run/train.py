"""The training loop of a run: set it up (setup.py), resume or initialise its state (state.py), run its
rounds (rounds.py), checkpoint and log each one, then write the summary, the best adapters in PEFT format
and the final evaluation. `experiments/train.py` is the thin entry point.

Re-running on the same workdir resumes from the last checkpoint and ends exactly where an uninterrupted
run ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading

import jax
import numpy as np
from tqdm import tqdm

from fellrec_jax import files
from fellrec_jax.model import hf_interop
from fellrec_jax.federated import sharding
from fellrec_jax.run import checkpoint
from fellrec_jax.run import distributed
from fellrec_jax.run import evaluate as evaluation
from fellrec_jax.run import rounds
from fellrec_jax.run import setup as setup_lib
from fellrec_jax.run import state as state_lib
from fellrec_jax.run import tracking
from fellrec_jax.run import round_records
from fellrec_jax.run.round_records import json_float
from fellrec_jax.run.setup import Run
from fellrec_jax.run.state import TrainState

logger = logging.getLogger("fellrec_jax")


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on SIGTERM after checkpointing; run the same command again


class Preempted(Exception):
  """The run stopped on SIGTERM (a preemption or time-limit notice) after checkpointing its last round."""

  def __init__(self, rounds_done: int):
    super().__init__(f"stopped on SIGTERM after round {rounds_done - 1}, checkpointed; run the same command "
                     f"again to resume (exit code {PREEMPTED_EXIT_CODE})")
    self.rounds_done = rounds_done


def train(config, workdir) -> dict:
  """Run (or resume) the federated training of `config` in `workdir`; returns the summary.

  Raises Preempted when SIGTERM arrives: the round under way finishes and is checkpointed first.
  """
  with preemption_notice() as notice:
    run = rounds.plan_round_shapes(setup_lib.setup(config, workdir))
    if distributed.is_main():
      files.write_json(run.workdir / "config.json", setup_lib.config_dict(config))
    mngr = checkpoint.manager(run.workdir / "checkpoints", config.keep_checkpoints)
    state = state_lib.resume_or_init(run, mngr)
    valid = rounds.validation_data(run)
    fingerprint = checkpoint.config_fingerprint(setup_lib.config_dict(config), state_lib.RESUMABLE_FIELDS)
    first = int(state.server.rounds_done)
    last = config.fed.rounds
    if config.max_rounds_per_run:
      last = min(last, first + config.max_rounds_per_run)
    todo = range(first, last) if not bool(state.server.stopped) else range(0)
    progress = tqdm(todo, desc="rounds", unit="round", initial=first, total=config.fed.rounds,
                    disable=not distributed.is_main())
    for r in progress:
      state, record = rounds.run_round(run, state, r, valid)
      if config.eval.every and (r + 1) % config.eval.every == 0:
        record["eval"] = evaluation.evaluate(run, state.best_adapters, write=False)
      log_round(run, record, progress)
      rounds.check_clients_left(state, config)
      stop = distributed.any_process(notice.requested)
      if stop or bool(state.server.stopped) or r == last - 1 or (r + 1) % config.checkpoint_every == 0:
        checkpoint.save(mngr, r + 1, state_lib.checkpointable(state), {"config": fingerprint, "rounds_done": r + 1})
      if stop:
        raise Preempted(r + 1)
      if bool(state.server.stopped):
        logger.info("early stop after round %d: no better weighted validation loss for %d rounds", r,
                    int(state.server.stale_rounds))
        break
    progress.close()
    summary = summarize(run, state)
    save_best_adapters(run, state)
    files.fault_point("adapters_written")
    if distributed.is_main():
      files.write_json(run.workdir / "summary.json", summary)
      print(summary_table(summary))
    files.fault_point("summary_written")
    if config.eval.at_end:
      summary["eval"] = evaluation.evaluate(run, state.best_adapters)["overall"]
      files.fault_point("eval_written")
      if distributed.is_main():
        files.write_json(run.workdir / "summary.json", summary)
    tracking.finish(run, summary)  # the final evaluation to the trackers; they close
  return summary


class _Notice:
  requested = False


@contextlib.contextmanager
def preemption_notice():
  """While the block runs, SIGTERM only sets `.requested` (the loop then checkpoints and stops)."""
  notice = _Notice()
  if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
    yield notice
    return

  def handler(signum, frame):
    notice.requested = True
    logger.warning("%sSIGTERM: finishing the current round, then checkpointing and stopping",
                   distributed.log_prefix())

  previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield notice
  finally:
    signal.signal(signal.SIGTERM, previous)


def log_round(run: Run, record: dict, progress) -> None:
  """The round's line in metrics.jsonl (process 0; a large round's full arrays in rounds/round_<r>.npz), its
  progress bar and log line."""
  arrays = record.pop(round_records.ARRAYS, None)
  if distributed.is_main():
    if arrays is not None:
      save_round_arrays(run.workdir / "rounds" / f"round_{record['round']:05d}.npz", arrays)
    files.append_line(run.workdir / "metrics.jsonl", json.dumps(record))
    files.fault_point("metrics_line")
  tracking.log_round(run, record, arrays)  # TensorBoard / W&B when enabled (log.*), process 0
  losses = train_losses(record, arrays)
  mean = f"{np.mean(losses):.3f}" if len(losses) else "-"
  progress.set_postfix(train=mean, val=f"{record['val_loss_weighted']:.3f}")
  shown = [round(x, 3) for x in losses] if len(losses) <= 10 else (
      f"{len(losses)} clients: min {min(losses):.3f}, mean {mean}, max {max(losses):.3f}")
  logger.info("round %d: weighted val loss %.4f, train losses %s, %.1f s", record["round"],
              record["val_loss_weighted"], shown, record["seconds"])


def train_losses(record: dict, arrays: dict | None) -> list[float]:
  """The finite training losses of the clients that trained this round."""
  if "clients" in record:
    return [c["train_loss"] for c in record["clients"] if c["train_loss"] is not None]
  losses = np.asarray(arrays["train_loss"], np.float64)
  return losses[np.isfinite(losses)].tolist()


def save_round_arrays(path, arrays: dict) -> None:
  """A round's full per-client arrays and mixing matrix, written atomically (temp file + rename)."""
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    np.savez(f, **arrays)


def summarize(run: Run, state: TrainState) -> dict:
  server = state.server
  return {
      "rounds_done": int(server.rounds_done), "early_stopped": bool(server.stopped),
      "best_weighted_val_loss": json_float(server.best_weighted),
      "clients": [{"client": c, "train_examples": int(run.data.num_train_examples[c]),
                   "valid_examples": int(run.data.num_valid_examples[c]),
                   "best_val_loss": json_float(server.best_val[c]), "best_round": int(server.best_round[c])}
                  for c in range(run.num_clients)],
  }


def summary_table(summary: dict) -> str:
  lines = [f"rounds run: {summary['rounds_done']}" + (" (early stop)" if summary["early_stopped"] else ""),
           f"best weighted validation loss: {summary['best_weighted_val_loss']}",
           f"{'client':>6} {'train':>6} {'valid':>6} {'best val loss':>14} {'best round':>10}"]
  for c in summary["clients"]:
    best = "-" if c["best_val_loss"] is None else f"{c['best_val_loss']:.4f}"
    lines.append(f"{c['client']:>6} {c['train_examples']:>6} {c['valid_examples']:>6} {best:>14} "
                 f"{c['best_round']:>10}")
  return "\n".join(lines)


def save_best_adapters(run: Run, state: TrainState, max_clients: int = 64) -> None:
  """Each client's best adapters as a PEFT directory (workdir/adapters/client_<c>), for up to 64 clients."""
  if run.num_clients > max_clients:
    logger.info("%d clients: best adapters are in the Orbax checkpoint only (no PEFT export above %d)",
                run.num_clients, max_clients)
    return
  best = sharding.to_host(state.best_adapters)
  if not distributed.is_main():
    return
  for c in range(run.num_clients):
    base_dir = run.config.model.hf_dir or run.config.pretrain.cache_dir or str(run.workdir / "base_model")
    hf_interop.save_peft_adapter(run.workdir / "adapters" / f"client_{c}", jax.tree.map(lambda x: x[c], best),
                                 run.lcfg, base_dir)
