"""What the entry points (experiments/*.py) share: joining a multi-process job, and how a run ends.

Exit codes: 0 done; 75 stopped on SIGTERM after checkpointing (run the same command again to resume);
1 an error, printed as one line naming the setting at fault (or a traceback for anything unexpected).
"""

from __future__ import annotations

import sys

from absl import flags

from fellrec_jax.data.records import DataError
from fellrec_jax.federated import sharding
from fellrec_jax.model import hf_interop
from fellrec_jax.run import checkpoint
from fellrec_jax.run import distributed
from fellrec_jax.run import train

_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "Multi-process job: host:port of process 0's coordinator (else JAX_COORDINATOR_ADDRESS, "
    "or detected under Slurm and on TPU pods).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process job: the number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process job: this process's index, 0-based.")
_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", distributed.DEFAULT_TIMEOUT_S,
    "Multi-process job: seconds to reach the coordinator, and before a silent process is declared dead.")


def join(mesh_devices: int) -> None:
  """Join the multi-process job this process belongs to, if any (a single process: nothing happens)."""
  processes = distributed.detect(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  distributed.initialize(processes, mesh_devices=mesh_devices, timeout_s=_TIMEOUT.value)
  sharding.enough_cpu_threads()


def run(fn, *args, **kwargs):
  """fn(*args, **kwargs), ending the process with the documented exit code for a preemption or a setup error."""
  try:
    return fn(*args, **kwargs)
  except train.Preempted as e:
    print(f"{distributed.log_prefix()}{e}", file=sys.stderr)
    sys.exit(train.PREEMPTED_EXIT_CODE)
  except (distributed.DistributedError, sharding.MeshError, checkpoint.ResumeError, DataError,
          hf_interop.CheckpointError) as e:
    print(f"error: {distributed.log_prefix()}{e}", file=sys.stderr)
    sys.exit(1)
