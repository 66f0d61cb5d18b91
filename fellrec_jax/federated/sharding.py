"""Device mesh and shardings: a `clients` axis for client-stacked state, a `model` axis for the base.

The frozen base is one pytree sharded Megatron-style over `model` (column-parallel q/k/v/gate/up and the
head, row-parallel o/down, vocabulary-parallel embeddings) by a small rules table; everything with a
leading client axis is sharded over `clients`. Computation follows the data (GSPMD); on one device every
sharding is trivial and the numbers are the same.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Partition of the weight of each module of the base (layer-stacked weights start with the layer axis);
# biases and norm scales are replicated.
BASE_RULES = {
    "embed_tokens": P("model", None),
    "lm_head": P(None, "model"),
    "q_proj": P(None, None, "model"), "k_proj": P(None, None, "model"), "v_proj": P(None, None, "model"),
    "gate_proj": P(None, None, "model"), "up_proj": P(None, None, "model"),
    "o_proj": P(None, "model", None), "down_proj": P(None, "model", None),
}


class MeshError(ValueError):
  """A mesh that does not fit the job's devices."""


def enough_cpu_threads() -> None:
  """Gives XLA:CPU's runtime threads for its simulated devices (call before the first JAX computation).

  With `--xla_force_host_platform_device_count=N` every device's part of a program is a task on one
  thread pool (a thread per core by default; the NPROC variable overrides it), and a task waiting in an
  all-reduce holds its thread. With few cores, the parts of two programs in flight can hold every thread
  while a part they wait for is queued: XLA aborts after 40 s. Four threads per device leave room.
  """
  match = re.search(r"xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  if match and "NPROC" not in os.environ:
    os.environ["NPROC"] = str(max(4 * int(match.group(1)), os.cpu_count() or 1))


def make_mesh(clients: int = 1, model: int = 1) -> Mesh:
  """A (clients, model) mesh over the first clients*model devices, ordered by process: a row of the
  `clients` axis (one client shard's `model` devices) then lies within one process, so that each process
  holds whole clients. A multi-process job must use every device, and each process a whole number of rows.
  """
  if clients < 1 or model < 1:
    raise ValueError(f"mesh.clients and mesh.model must be >= 1, got {clients} and {model}")
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  if clients * model > len(devices):
    raise ValueError(f"mesh.clients * mesh.model = {clients * model} devices, but only {len(devices)} are "
                     f"visible ({devices[0].platform}); on CPU, set "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={clients * model}")
  if jax.process_count() > 1 and clients * model == 1:  # not configured: the job's devices on `clients`
    clients = len(devices)
  if jax.process_count() > 1:
    local = jax.local_device_count()
    if clients * model != len(devices) or local % model:
      raise MeshError(
          f"mesh.clients x mesh.model = {clients} x {model} does not match the job's devices: "
          f"{jax.process_count()} processes with {local} devices each ({len(devices)} in all). Every device "
          f"must be in the mesh, and mesh.model must divide each process's {local} devices")
  return Mesh(np.asarray(devices[:clients * model]).reshape(clients, model), ("clients", "model"))


def _fits(spec: P, shape, mesh: Mesh) -> P:
  """The spec, with any axis that does not divide its dimension replaced by replication. Trailing
  replicated axes are left out, as in the shardings jit gives its outputs: P("clients") and P("clients",
  None) place alike but are different keys to jit, so a round fed its own outputs would compile again."""
  parts = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    parts.append(axis if axis is None or dim % mesh.shape[axis] == 0 else None)
  while parts and parts[-1] is None:
    parts.pop()
  return P(*parts)


def base_shardings(base: dict, mesh: Mesh):
  def rule(path, leaf):
    module, name = path[-2].key, path[-1].key
    spec = BASE_RULES.get(module, P()) if name in ("kernel", "embedding") else P()
    return NamedSharding(mesh, _fits(spec, leaf.shape, mesh))

  return jax.tree_util.tree_map_with_path(rule, base)


def client_shardings(tree, mesh: Mesh):
  """Leading client axis over `clients` (replicated when the client count does not divide)."""
  return jax.tree.map(lambda x: NamedSharding(mesh, _fits(P("clients"), np.shape(x), mesh)), tree)


def put_clients(tree, mesh: Mesh):
  """Client-stacked values, the same full value on every process, sharded over `clients` (through the
  host, as `replicate`)."""
  return jax.device_put(to_host(tree), client_shardings(tree, mesh))


def put_local_clients(tree, mesh: Mesh, num_clients: int):
  """Client-stacked values of this process's clients only (distributed.local_clients), as global arrays
  of all `num_clients` clients sharded over `clients`: no process holds another's clients' data."""
  def one(x):
    x = np.asarray(x)
    shape = (num_clients, *x.shape[1:])
    return jax.make_array_from_process_local_data(NamedSharding(mesh, _fits(P("clients"), shape, mesh)), x, shape)

  return jax.tree.map(one, tree)


def put_base(base, mesh: Mesh):
  return jax.device_put(base, base_shardings(base, mesh))


def replicate(tree, mesh: Mesh):
  """Every leaf whole on every device of the mesh. Through the host: a value committed to one device
  does not become a global array of a multi-process mesh by device_put."""
  return jax.device_put(to_host(tree), NamedSharding(mesh, P()))


def to_host(tree):
  """numpy values of a pytree of arrays, on every process (arrays sharded across processes are gathered:
  every process must call this at the same point)."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)
