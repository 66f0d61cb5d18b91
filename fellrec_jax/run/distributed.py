"""Runs across processes (hosts): starting JAX's distributed runtime, which process holds which clients,
and moving values between global arrays and the host (docs/cluster.md).

A single-process run never touches any of this beyond `is_main()` (True) and `local_clients` (all).
With several processes, every process runs the same program on its own devices; the mesh spans all of
them, each process holds whole clients (a row of the mesh's `clients` axis lies in one process), builds
only those clients' batches, and process 0 alone writes the run's files. The workdir must be on a file
system every process sees (checkpoints are written by all of them, each its own shards).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import socket
import time
from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

logger = logging.getLogger("fellrec_jax")

DEFAULT_TIMEOUT_S = 300  # seconds to reach the coordinator, and before a silent peer is declared dead
# CPU devices of each process of a CPU job: a number, or "auto" (mesh devices / processes; the launcher's).
CPU_DEVICES_VARIABLE = "FELLREC_CPU_DEVICES_PER_PROCESS"


class DistributedError(ValueError):
  """A multi-process setup that cannot work, with the setting at fault."""


@dataclasses.dataclass(frozen=True)
class Processes:
  """Where this process stands in a multi-process job (None fields: JAX detects them from the cluster)."""

  coordinator: str | None
  num_processes: int | None
  process_id: int | None
  source: str  # what said the job is multi-process: flags, JAX variables, Slurm, TPU


def detect(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
           env: Mapping[str, str] = os.environ) -> Processes | None:
  """The job's processes from flags, else JAX's variables, else Slurm or a TPU pod; None: one process.

  Flags and JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID give all three values; under
  Slurm (srun with several tasks) and on a TPU pod slice JAX finds them itself.
  """
  given = {"--coordinator": coordinator, "--num_processes": num_processes, "--process_id": process_id}
  if any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise DistributedError(f"a multi-process run needs --coordinator, --num_processes and --process_id; "
                             f"missing {', '.join(missing)}")
    return _checked(Processes(coordinator, int(num_processes), int(process_id), "flags"))
  names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
  if any(n in env for n in names):
    missing = [n for n in names if n not in env]
    if missing:
      raise DistributedError(f"{', '.join(n for n in names if n in env)} set but {', '.join(missing)} not")
    return _checked(Processes(env[names[0]], int(env[names[1]]), int(env[names[2]]), "JAX variables"))
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_NODELIST" in env:
    return Processes(None, None, None, "Slurm")
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return Processes(None, None, None, "TPU pod")
  return None


def _checked(p: Processes) -> Processes | None:
  if p.num_processes < 1 or not 0 <= p.process_id < p.num_processes:
    raise DistributedError(f"process_id={p.process_id} is not in [0, num_processes={p.num_processes}) "
                           f"({p.source})")
  if p.num_processes == 1:
    return None
  if not re.fullmatch(r"[^:\s]+:\d+", p.coordinator or ""):
    raise DistributedError(f"coordinator address {p.coordinator!r} is not host:port ({p.source})")
  return p


def set_cpu_devices(per_process: int) -> None:
  """XLA:CPU devices of this process (before JAX starts): each process of a CPU run holds its own."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={per_process}".strip()


def initialize(processes: Processes | None, *, mesh_devices: int = 1,
               timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
  """Start JAX's distributed runtime for a multi-process job (no-op for one process).

  `mesh_devices` (mesh.clients x mesh.model) sizes each process's CPU devices when the launcher asks
  for it (FELLREC_CPU_DEVICES_PER_PROCESS=auto). A coordinator that cannot be reached within `timeout_s`
  is an error naming it; a process that does not join within `timeout_s`, or a peer silent that long once
  running, makes JAX end every process (its "DEADLINE_EXCEEDED" / "another task died" message).
  """
  if processes is None:
    return
  per_process = os.environ.get(CPU_DEVICES_VARIABLE, "")
  if per_process == "auto" and mesh_devices == 1:  # no mesh configured: one device per process
    set_cpu_devices(1)
  elif per_process == "auto":
    if mesh_devices % processes.num_processes:
      raise DistributedError(f"mesh.clients x mesh.model = {mesh_devices} devices do not split evenly over "
                             f"{processes.num_processes} processes")
    set_cpu_devices(mesh_devices // processes.num_processes)
  elif per_process:
    set_cpu_devices(int(per_process))
  if processes.coordinator and processes.process_id:
    # JAX aborts the process (no Python exception) when it cannot register with the coordinator: look
    # first, so that an unreachable address is an error that says which setting to fix.
    _wait_for_coordinator(processes, timeout_s)
  elif processes.coordinator:
    logger.info("process 0 coordinates the job at %s; waiting up to %d s for the other %d processes",
                processes.coordinator, timeout_s, processes.num_processes - 1)
  jax.distributed.initialize(processes.coordinator, processes.num_processes, processes.process_id,
                             initialization_timeout=timeout_s, heartbeat_timeout_seconds=timeout_s,
                             shutdown_timeout_seconds=timeout_s)
  logger.info("process %d of %d (%s), %d local / %d global devices", jax.process_index(), jax.process_count(),
              processes.source, jax.local_device_count(), jax.device_count())


def _wait_for_coordinator(processes: Processes, timeout_s: int) -> None:
  host, port = processes.coordinator.rsplit(":", 1)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise DistributedError(
            f"process {processes.process_id} of {processes.num_processes} could not join the job at "
            f"{processes.coordinator} within {timeout_s} s (--coordinator / JAX_COORDINATOR_ADDRESS, from "
            f"{processes.source}; is process 0 running and the port open?): {e}") from e
      time.sleep(0.5)


def is_main() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Every process waits here until all have arrived (no-op for one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def main_first(name: str):
  """Process 0 runs the block first (e.g. writes caches to the workdir), then the others (who read them)."""
  if not is_main():
    barrier(name)
  yield
  if is_main():
    barrier(name)


def any_process(flag: bool) -> bool:
  """Whether `flag` holds on any process (every process must call this at the same point)."""
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray([flag], np.int32))
  return bool(np.any(flags))


def local_clients(mesh, num_clients: int) -> np.ndarray:
  """The clients whose state and data this process holds (all of them with one process), ascending."""
  sharding = NamedSharding(mesh, P("clients") if num_clients % mesh.shape["clients"] == 0 else P())
  rows = set()
  for index in sharding.addressable_devices_indices_map((num_clients,)).values():
    rows.update(range(num_clients)[index[0]])
  return np.asarray(sorted(rows), np.int64)


def log_prefix() -> str:
  """"[process i/n] " in a multi-process job, else ""."""
  return f"[process {jax.process_index()}/{jax.process_count()}] " if jax.process_count() > 1 else ""
