"""Local training of every client in one jitted call per round.

Client state is one pytree with a leading client axis C (adapters, optimizer state, PRNG key); the frozen
base is shared and unbatched. Each optimizer step runs the explicit client/server split
(split_learning.py), accumulates gradients over `accum_steps` micro-batches of rows, normalises by the
step's label-token count and applies AdamW with the reference's per-round linear schedule. Steps beyond a
client's data are masked and change nothing, optimizer state included.

By default the round is a `vmap` over clients of a `lax.scan` over each client's steps. With
`clients_per_chunk` = V < C it is a scan over "waves" of a vmap over V lanes, each lane training several
clients one after another (assigned longest first, so the lanes' step counts balance): memory is bounded
by V, and small clients do not idle while a large one finishes. A lane loads a client's state before its
first step and stores it after its last.

Each step of all clients runs as streams of their tokens (stream.py); with the client state sharded over
a mesh's `clients` axis, every device streams its own clients (shard_map). LoRA dropout masks are drawn per
client and per token from the client's own key (kernels.DropoutKeys), so every path draws the same ones.
`LocalConfig.streamed = False` runs the reference path instead: a `vmap` over clients of each client's
own computation of packed rows (also what lanes on a client mesh run).

`sequential_local_round` trains the clients one by one: the debug path that must give the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fellrec_jax.model import llama as model_lib
from fellrec_jax.federated import optimizer as optimizer_lib
from fellrec_jax.federated import split_learning
from fellrec_jax.federated import stream


@dataclasses.dataclass(frozen=True)
class LocalConfig:
  """Static settings of local training (hashable: a jit static argument)."""

  split: split_learning.SplitConfig
  optimizer: optimizer_lib.OptimizerConfig
  accum_steps: int = 1  # micro-batches per optimizer step (rows per step must be a multiple)
  prox_mu: float = 0.0  # FedProx / Ditto proximal coefficient: mu/2 * ||theta - anchor||^2
  stream_groups: int = 1  # streamed steps: independent streams of client groups (XLA runs them concurrently)
  streamed: bool = True  # steps as streams of all clients' tokens (fast); False: the per-client vmap (reference)


class ClientStates(NamedTuple):
  """Per-client state, every leaf with a leading client axis."""

  adapters: Any
  opt_state: Any  # None when the optimizer is fresh each round
  rng: jax.Array  # [C, 2] PRNG keys


class ClientBatches(NamedTuple):
  """Steps of packed rows: [S, R, T] for one client, [C, S, R, T] for all, [W, V, R, T] for lanes."""

  tokens: Any
  positions: Any
  segment_ids: Any
  loss_mask: Any
  step_mask: Any  # bool [S] / [C, S] / [W, V]: the step holds data


class RoundContext(NamedTuple):
  """Per-round values that are traced, not static (no recompilation between rounds)."""

  warmup_steps: jax.Array  # int32 scalar (the reference warms up in round 0 only)
  lr_scale: jax.Array  # [C] multiplier of each client's learning rate (heat.apply_to local lr)


class ClientMetrics(NamedTuple):
  train_loss: jax.Array  # [C] mean of the real steps' losses (the HF Trainer's train_loss)
  num_steps: jax.Array  # [C] real optimizer steps
  label_tokens: jax.Array  # [C] label tokens seen


class LaneSchedule(NamedTuple):
  """Which client each lane trains at each wave (host-side numpy, [W, V])."""

  client: np.ndarray  # int32: the client (0 on idle slots)
  step: np.ndarray  # int32: that client's step index
  active: np.ndarray  # bool: the slot trains a step
  first: np.ndarray  # bool: the lane loads the client's state before this step
  last: np.ndarray  # bool: the lane stores the client's state after this step


def batches_from(round_batches) -> ClientBatches:
  """ClientBatches from the data pipeline's RoundBatches (or anything with the same fields)."""
  return ClientBatches(round_batches.tokens, round_batches.positions, round_batches.segment_ids,
                       round_batches.loss_mask, round_batches.step_mask)


def init_client_states(adapters, lc: LocalConfig, rng) -> ClientStates:
  num_clients = jax.tree.leaves(adapters)[0].shape[0]
  opt_state = None
  if not lc.optimizer.fresh_each_round:
    opt_state = jax.vmap(optimizer_lib.transform(lc.optimizer).init)(adapters)
  return ClientStates(adapters, opt_state, jax.random.split(rng, num_clients))


# ----------------------------------------------------------------------------------------------------
# One optimizer step


def _micro_batches(batch, accum_steps: int, axis: int = 0):
  """[.., R, T] arrays (rows on `axis`) as [accum_steps, .., R / accum_steps, T]."""
  rows = batch[0].shape[axis]
  if rows % accum_steps:
    raise ValueError(f"rows per step ({rows}) must be a multiple of accum_steps ({accum_steps})")
  split = lambda x: jnp.moveaxis(x.reshape(*x.shape[:axis], accum_steps, rows // accum_steps, *x.shape[axis + 1:]),
                                 axis, 0)
  return tuple(split(x) for x in batch)


def step_loss_and_grads(base, adapters, batch, prefix_tokens, prefix_loss_mask, lc: LocalConfig, rng):
  """(NLL sum, label count, gradient sum) of one optimizer step, accumulated over micro-batches."""

  def accumulate(carry, xs):
    total, count, grads = carry
    (tokens, positions, segment_ids, loss_mask), index = xs
    inputs = model_lib.Inputs(tokens, positions, segment_ids, prefix_tokens)
    micro_rng = None if rng is None else jax.random.fold_in(rng, index)
    t, c, g = split_learning.loss_and_grads(base, adapters, inputs, loss_mask, prefix_loss_mask, lc.split,
                                            micro_rng)
    return (total + t, count + c, jax.tree.map(jnp.add, grads, g)), None

  zeros = jax.tree.map(jnp.zeros_like, adapters)
  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
  xs = (_micro_batches(batch, lc.accum_steps), jnp.arange(lc.accum_steps))
  (total, count, grads), _ = jax.lax.scan(accumulate, init, xs)
  return total, count, grads


class StepOutput(NamedTuple):
  adapters: Any
  opt_state: Any
  count: jax.Array  # real steps taken so far this round
  loss: jax.Array  # the step's mean label NLL (0 when masked)
  labels: jax.Array  # the step's label tokens (0 when masked)


def train_step(base, adapters, opt_state, count, batch, real, prefix_tokens, prefix_loss_mask, anchor,
               warmup_steps, total_steps, lr_scale, rng, lc: LocalConfig) -> StepOutput:
  """One optimizer step of one client; a masked step (real = False) returns its inputs unchanged."""
  step_rng = jax.random.fold_in(rng, count) if lc.split.needs_rng else None
  if lc.split.defences.dp_sgd:  # DP-SGD: per-example clipping and noise (privacy/defences.py)
    total, labels, grads = split_learning.dp_step_loss_and_grads(base, adapters, batch, prefix_tokens,
                                                                 prefix_loss_mask, lc.split, step_rng)
  else:
    total, labels, grads = step_loss_and_grads(base, adapters, batch, prefix_tokens, prefix_loss_mask, lc,
                                               step_rng)
  return apply_step(adapters, opt_state, count, total, labels, grads, real, anchor, warmup_steps, total_steps,
                    lr_scale, lc)


def apply_step(adapters, opt_state, count, total, labels, grads, real, anchor, warmup_steps, total_steps,
               lr_scale, lc: LocalConfig) -> StepOutput:
  """The update of one client's optimizer step from its (NLL sum, label count, gradient sum)."""
  grads = jax.tree.map(lambda g: g / jnp.maximum(labels, 1.0), grads)
  if lc.prox_mu:
    grads = jax.tree.map(lambda g, p, a: g + lc.prox_mu * (p - a), grads, adapters, anchor)
  tx = optimizer_lib.transform(lc.optimizer)
  updates, new_opt_state = tx.update(grads, opt_state, adapters)
  lr = optimizer_lib.learning_rate(lc.optimizer, count, total_steps, warmup_steps) * lr_scale
  new_adapters = jax.tree.map(lambda p, u: p - (lr * u).astype(p.dtype), adapters, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(real, n, o), new, old)
  return StepOutput(keep(new_adapters, adapters), keep(new_opt_state, opt_state), count + real.astype(jnp.int32),
                    jnp.where(real, total / jnp.maximum(labels, 1.0), 0.0), jnp.where(real, labels, 0.0))


def streamed_step(base, adapters, opt_state, count, batch, real, prefix_tokens, prefix_loss_mask, anchors,
                  warmup_steps, total_steps, lr_scale, rng, lc: LocalConfig,
                  budget: tuple[stream.Budgets, ...]) -> StepOutput:
  """`train_step` of every client at once ([C, ...] arguments): the loss and gradients of all clients'
  tokens as streams (stream.py), one per group of clients (`budget`: one per group; independent
  computations that XLA can run side by side), then each client's update. `rng` [C, 2]: each client's
  round key, folded as `train_step` and `step_loss_and_grads` fold it (the same dropout masks)."""
  micro = _micro_batches(batch, lc.accum_steps, axis=1)
  C = real.shape[0]
  groups = stream.group_bounds(C, len(budget))
  fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))
  step_rng = jax.vmap(jax.random.fold_in)(rng, count) if lc.split.lora.dropout > 0 else None

  def group_loss_and_grads(xs, index):
    micro_rng = None if step_rng is None else fold(step_rng, index)
    parts = [stream.loss_and_grads(base, jax.tree.map(lambda x: x[a:b], adapters), tuple(x[a:b] for x in xs),
                                   real[a:b], prefix_tokens, prefix_loss_mask, lc.split, group_budget,
                                   None if micro_rng is None else micro_rng[a:b])
             for (a, b), group_budget in zip(groups, budget)]
    return jax.tree.map(lambda *p: jnp.concatenate(p), *parts)

  def accumulate(carry, xs):
    total, labels, grads = carry
    t, c, g = group_loss_and_grads(*xs)
    return (total + t, labels + c, jax.tree.map(jnp.add, grads, g)), None

  init = (jnp.zeros(C, jnp.float32), jnp.zeros(C, jnp.float32), jax.tree.map(jnp.zeros_like, adapters))
  (total, labels, grads), _ = jax.lax.scan(accumulate, init, (micro, jnp.arange(lc.accum_steps)))
  update = functools.partial(apply_step, lc=lc)
  return jax.vmap(update, in_axes=(0, 0, 0, 0, 0, 0, 0, 0, None, 0, 0))(
      adapters, opt_state, count, total, labels, grads, real, anchors, warmup_steps, total_steps, lr_scale)


Sizes = tuple[tuple[stream.Budgets, ...], ...]  # budgets a streamed step may run at (one per group), ascending


def sized_step(sizes: Sizes, size, *args, lc: LocalConfig) -> StepOutput:
  """`streamed_step(*args)` at the budgets `sizes[size]` (`size`: a traced index, the smallest size that
  holds the step, `stream.size_of_steps`): a switch between the step compiled at each size, only one of
  which runs. The padding differs, the numbers are those of any size that holds the step."""
  steps = [functools.partial(streamed_step, lc=lc, budget=budget) for budget in sizes]
  if len(steps) == 1:
    return steps[0](*args)
  return jax.lax.switch(size, steps, *args)


# ----------------------------------------------------------------------------------------------------
# Lanes: a scan over waves of a vmap over V lanes, each training several clients in turn


def lane_schedule(client_steps, lanes: int = 0) -> LaneSchedule:
  """Assign clients to lanes (longest first, to the least loaded lane); lanes = 0 means one per client."""
  client_steps = np.asarray(client_steps, np.int64)
  num_clients = len(client_steps)
  lanes = num_clients if lanes <= 0 else min(lanes, num_clients)
  if lanes == num_clients:
    queues = [[c] for c in range(num_clients)]
  else:
    queues, load = [[] for _ in range(lanes)], np.zeros(lanes, np.int64)
    for c in np.argsort(-client_steps, kind="stable"):
      lane = int(np.argmin(load))
      queues[lane].append(int(c))
      load[lane] += client_steps[c]
  waves = max(1, max(sum(int(client_steps[c]) for c in q) for q in queues))
  shape = (waves, lanes)
  schedule = LaneSchedule(np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, bool),
                          np.zeros(shape, bool), np.zeros(shape, bool))
  for lane, queue in enumerate(queues):
    wave = 0
    for c in queue:
      n = int(client_steps[c])
      if n == 0:
        continue
      schedule.client[wave:wave + n, lane] = c
      schedule.step[wave:wave + n, lane] = np.arange(n)
      schedule.active[wave:wave + n, lane] = True
      schedule.first[wave, lane] = schedule.last[wave + n - 1, lane] = True
      wave += n
  return schedule


def arrange(batches: ClientBatches, schedule: LaneSchedule) -> ClientBatches:
  """[C, S, ...] client steps rearranged into the schedule's [W, V, ...] slots (host-side gather)."""
  pick = lambda x: np.asarray(x)[schedule.client, schedule.step]
  arranged = ClientBatches(*(pick(x) for x in batches[:4]), schedule.active.copy())
  if not np.all(np.asarray(batches.step_mask)[schedule.client, schedule.step] | ~schedule.active):
    raise ValueError("the lane schedule asks for steps that the batches mark as empty")
  return arranged


def _gather(tree, index):
  return jax.tree.map(lambda x: x[index], tree)


def _scatter(tree, index, values):
  """tree[index] = values, dropping out-of-range indices (slots that store nothing)."""
  return jax.tree.map(lambda x, v: x.at[index].set(v, mode="drop"), tree, values)


def _lanes_round(base, states: ClientStates, waves: ClientBatches, client, first, last, prefix_tokens,
                 prefix_loss_mask, anchors, ctx: RoundContext, lc: LocalConfig, sizes: Sizes | None = None,
                 size=None):
  """The lanes round; with `sizes`, each wave's steps run as one stream (`sized_step`; `size` [W]: each
  wave's size)."""
  num_clients = states.rng.shape[0]
  tx = optimizer_lib.transform(lc.optimizer)
  keys = jax.vmap(jax.random.split)(states.rng)
  next_rng, round_rng = keys[:, 0], keys[:, 1]
  total_steps = jnp.zeros(num_clients, jnp.int32).at[client].add(waves.step_mask.astype(jnp.int32))
  step = jax.vmap(functools.partial(train_step, lc=lc),
                  in_axes=(None, 0, 0, 0, 0, 0, None, None, 0, None, 0, 0, 0))
  lane_adapters = _gather(states.adapters, client[0])
  lane_opt = jax.vmap(tx.init)(lane_adapters)
  lanes = client.shape[1]

  def wave(carry, xs):
    adapters, opt_state, lane_adapters, lane_opt, lane_count, sums = carry
    batch, active, c, is_first, is_last, wave_size = xs
    where_first = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(is_first.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)
    lane_adapters = where_first(_gather(adapters, c), lane_adapters)
    loaded_opt = jax.vmap(tx.init)(lane_adapters) if opt_state is None else _gather(opt_state, c)
    lane_opt = where_first(loaded_opt, lane_opt)
    lane_count = jnp.where(is_first, 0, lane_count)
    if sizes is None:
      out = step(base, lane_adapters, lane_opt, lane_count, batch, active, prefix_tokens, prefix_loss_mask,
                 _gather(anchors, c), ctx.warmup_steps, total_steps[c], ctx.lr_scale[c], round_rng[c])
    else:
      out = sized_step(sizes, wave_size, base, lane_adapters, lane_opt, lane_count, batch, active, prefix_tokens,
                       prefix_loss_mask, _gather(anchors, c), ctx.warmup_steps, total_steps[c], ctx.lr_scale[c],
                       round_rng[c], lc=lc)
    owner = jnp.where(active, c, num_clients)
    sums = tuple(s.at[owner].add(v, mode="drop") for s, v in zip(sums, (out.loss, out.labels)))
    store = jnp.where(active & is_last, c, num_clients)
    adapters = _scatter(adapters, store, out.adapters)
    if opt_state is not None:
      opt_state = _scatter(opt_state, store, out.opt_state)
    return (adapters, opt_state, out.adapters, out.opt_state, out.count, sums), None

  zeros = jnp.zeros(num_clients, jnp.float32)
  carry = (states.adapters, states.opt_state, lane_adapters, lane_opt, jnp.zeros(lanes, jnp.int32), (zeros, zeros))
  size = jnp.zeros(client.shape[0], jnp.int32) if size is None else size
  xs = (tuple(waves[:4]), waves.step_mask, client, first, last, size)
  (adapters, opt_state, _, _, _, (loss_sums, labels)), _ = jax.lax.scan(wave, carry, xs)
  metrics = ClientMetrics(loss_sums / jnp.maximum(total_steps, 1), total_steps, labels)
  return ClientStates(adapters, opt_state, next_rng), metrics


# ----------------------------------------------------------------------------------------------------
# One client's round, the vmap over clients, and the debug path


def client_update(base, adapters, opt_state, rng, batches: ClientBatches, prefix_tokens, prefix_loss_mask,
                  anchor, warmup_steps, lr_scale, lc: LocalConfig):
  """One client's local training for a round: a plain scan over its steps."""
  if lc.optimizer.fresh_each_round:
    opt_state = optimizer_lib.transform(lc.optimizer).init(adapters)
  next_rng, round_rng = jax.random.split(rng)
  total_steps = jnp.sum(batches.step_mask.astype(jnp.int32))

  def body(carry, xs):
    adapters, opt_state, count = carry
    batch, real = xs
    out = train_step(base, adapters, opt_state, count, batch, real, prefix_tokens, prefix_loss_mask, anchor,
                     warmup_steps, total_steps, lr_scale, round_rng, lc)
    return (out.adapters, out.opt_state, out.count), (out.loss, out.labels)

  init = (adapters, opt_state, jnp.int32(0))
  (adapters, opt_state, steps), (losses, labels) = jax.lax.scan(body, init, (tuple(batches[:4]), batches.step_mask))
  metrics = ClientMetrics(jnp.sum(losses) / jnp.maximum(steps, 1), steps, jnp.sum(labels))
  return adapters, (None if lc.optimizer.fresh_each_round else opt_state), next_rng, metrics


_client_update_jit = jax.jit(client_update, static_argnames=("lc",))


def _vmapped_round(base, states: ClientStates, batches: ClientBatches, prefix_tokens, prefix_loss_mask, anchors,
                   ctx: RoundContext, lc: LocalConfig):
  update = functools.partial(client_update, lc=lc)
  adapters, opt_state, rng, metrics = jax.vmap(update, in_axes=(None, 0, 0, 0, 0, None, None, 0, None, 0))(
      base, states.adapters, states.opt_state, states.rng, batches, prefix_tokens, prefix_loss_mask, anchors,
      ctx.warmup_steps, ctx.lr_scale)
  return ClientStates(adapters, opt_state, rng), metrics


def _streamed_round(base, states: ClientStates, batches: ClientBatches, prefix_tokens, prefix_loss_mask, anchors,
                    ctx: RoundContext, size, lc: LocalConfig, sizes: Sizes):
  """`_vmapped_round` with each step of all clients run as streams (`sized_step`; `size` [S]: each step's
  size)."""
  num_clients = states.rng.shape[0]
  opt_state = states.opt_state
  if lc.optimizer.fresh_each_round:
    opt_state = jax.vmap(optimizer_lib.transform(lc.optimizer).init)(states.adapters)
  keys = jax.vmap(jax.random.split)(states.rng)  # as client_update: (next, this round's)
  next_rng, round_rng = keys[:, 0], keys[:, 1]
  total_steps = jnp.sum(batches.step_mask.astype(jnp.int32), axis=1)

  def body(carry, xs):
    adapters, opt_state, count = carry
    batch, real, step_size = xs
    out = sized_step(sizes, step_size, base, adapters, opt_state, count, batch, real, prefix_tokens,
                     prefix_loss_mask, anchors, ctx.warmup_steps, total_steps, ctx.lr_scale, round_rng, lc=lc)
    return (out.adapters, out.opt_state, out.count), (out.loss, out.labels)

  by_step = lambda x: jnp.swapaxes(x, 0, 1)
  xs = (tuple(by_step(x) for x in batches[:4]), by_step(batches.step_mask), size)
  init = (states.adapters, opt_state, jnp.zeros(num_clients, jnp.int32))
  (adapters, opt_state, steps), (losses, labels) = jax.lax.scan(body, init, xs)
  metrics = ClientMetrics(jnp.sum(losses, axis=0) / jnp.maximum(steps, 1), steps, jnp.sum(labels, axis=0))
  return ClientStates(adapters, None if lc.optimizer.fresh_each_round else opt_state, next_rng), metrics


def _sharded_streamed_round(base, states: ClientStates, batches: ClientBatches, prefix_tokens, prefix_loss_mask,
                            anchors, ctx: RoundContext, size, lc: LocalConfig, sizes: Sizes, mesh: Mesh):
  """`_streamed_round` on every device of the mesh's `clients` axis over its own shard of the clients
  (shard_map): clients are independent within a round, so no device waits for another."""
  shard, whole = P("clients"), P()
  run = functools.partial(_streamed_round, lc=lc, sizes=sizes)
  in_specs = (whole, shard, shard, whole, whole, shard, RoundContext(whole, shard), whole)
  return jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=(shard, shard), check_vma=False)(
      base, states, batches, prefix_tokens, prefix_loss_mask, anchors, ctx, size)


# Client states are donated: their buffers are reused for the new states.
_vmapped_round_jit = jax.jit(_vmapped_round, static_argnames=("lc",), donate_argnums=(1,))
_streamed_round_jit = jax.jit(_streamed_round, static_argnames=("lc", "sizes"), donate_argnums=(1,))
_lanes_round_jit = jax.jit(_lanes_round, static_argnames=("lc", "sizes"), donate_argnums=(1,))
_sharded_streamed_round_jit = jax.jit(_sharded_streamed_round, static_argnames=("lc", "sizes", "mesh"),
                                      donate_argnums=(1,))


def client_mesh(states: ClientStates) -> Mesh | None:
  """The mesh whose `clients` axis shards the client state over several devices, when the base is whole on
  each of them (mesh.model = 1); None otherwise (one device, replicated or model-sharded state)."""
  sharding = getattr(jax.tree.leaves(states.adapters)[0], "sharding", None)
  if not isinstance(sharding, NamedSharding) or len(sharding.device_set) == 1:
    return None
  mesh = sharding.mesh
  sharded = tuple(sharding.spec)[:1] == ("clients",) and mesh.shape["clients"] > 1
  return mesh if sharded and mesh.shape.get("model", 1) == 1 else None


def streams(lc: LocalConfig, states: ClientStates, lanes: bool = False) -> bool:
  """Whether a round runs its steps as streams of the clients' tokens (stream.py), the fast path: unless
  `lc.streamed` is False (the reference path); on one device always, on several only when the client
  state is sharded over the mesh's `clients` axis (each device streams its own clients, `client_mesh`) and
  all clients train at once (`lanes` False: lanes on a client mesh run as a vmap of packed rows)."""
  if not lc.streamed:
    return False
  if lc.split.defences.enabled:  # boundary noise and DP-SGD run on each client's packed rows
    return False
  sharding = getattr(jax.tree.leaves(states.adapters)[0], "sharding", None)
  if sharding is None or len(sharding.device_set) == 1:
    return True
  return not lanes and client_mesh(states) is not None


def stream_needs(batches: ClientBatches, lc: LocalConfig, waves: bool = False, shards: int = 1) -> np.ndarray:
  """int [S, G, 2]: the row tokens and rows each step of a round's streams holds, per group
  (stream.group_needs, host-side): of batches [C, S, ...], a step of every client per step; or of waves
  [W, V, ...] (`arrange`), where a stream's members are the V lanes and its steps are the waves, so the
  needs are taken over [V, W, ...]. With `shards`, the members are split into that many equal shards
  (devices), each its own streams; one program runs on all of them, so each step needs the most of any
  shard. In a multi-process job each process measures the shards it holds, and the most over all
  processes is taken."""
  if isinstance(batches.segment_ids, jax.Array) and not batches.segment_ids.is_fully_addressable:
    return _multiprocess_needs(batches, lc)
  segment_ids, step_mask = np.asarray(batches.segment_ids), np.asarray(batches.step_mask)
  if waves:
    segment_ids, step_mask = np.swapaxes(segment_ids, 0, 1), np.swapaxes(step_mask, 0, 1)
  size = segment_ids.shape[0] // shards
  return np.max([stream.group_needs(segment_ids[i * size:(i + 1) * size], step_mask[i * size:(i + 1) * size],
                                    lc.accum_steps, lc.stream_groups) for i in range(shards)], axis=0)


def _multiprocess_needs(batches: ClientBatches, lc: LocalConfig) -> np.ndarray:
  """stream_needs of client-sharded global arrays: each device's shard measured where it lives."""
  def local_shards(x):
    by_start = {s.index[0].start or 0: np.asarray(s.data) for s in x.addressable_shards}
    return [by_start[k] for k in sorted(by_start)]

  local = np.max([stream.group_needs(seg, mask, lc.accum_steps, lc.stream_groups)
                  for seg, mask in zip(local_shards(batches.segment_ids), local_shards(batches.step_mask))], axis=0)
  return np.max(multihost_utils.process_allgather(local), axis=0)


def round_needs(batches, lc: LocalConfig, waves: bool = False, mesh=None) -> np.ndarray:
  """`stream_needs` of a round's steps: over waves (`arrange`) on the lanes path, per device shard on a
  client mesh (`client_mesh`), else over all clients' steps."""
  return stream_needs(batches, lc, waves=waves, shards=mesh.shape["clients"] if mesh is not None else 1)


def step_sizes(needs, sizes: Sizes | None) -> tuple[jax.Array, Sizes]:
  """(int32 [S]: each step's size, the sizes) for steps of needs [S, G, 2] (`round_needs`): the smallest of
  the planned `sizes` that holds the step (None: one size, this round's budgets), the largest size raised
  where a step needs more (one more compilation)."""
  needs = np.asarray(needs)
  if sizes is None:
    sizes = (stream.fit_groups(needs),)
  if len(sizes[0]) != needs.shape[1]:
    raise ValueError(f"{needs.shape[1]} stream groups, but sizes planned for {len(sizes[0])}")
  size, sizes = stream.size_of_steps(needs, sizes)
  return jnp.asarray(size), sizes


def local_round(base, states: ClientStates, batches: ClientBatches, prefix_tokens, prefix_loss_mask, anchors,
                ctx: RoundContext, *, lc: LocalConfig, lanes: int = 0, schedule: LaneSchedule | None = None,
                sizes: Sizes | None = None):
  """All clients' local training for one round from [C, S, ...] batches; `lanes` clients at once (0: all).
  `sizes`: the budgets the round's streamed steps may run at (`stream.plan_sizes` over all the run's rounds,
  so that every round runs one compiled program and each step at the smallest size that holds it); None:
  every step at the size of this round's largest.

  Returns the new ClientStates (the given ones are donated) and ClientMetrics.
  """
  num_clients = states.rng.shape[0]
  by_lanes = schedule is not None or 0 < lanes < num_clients
  streamed = streams(lc, states, by_lanes)
  if not by_lanes:
    batches = ClientBatches(*batches[:5])
    mesh = client_mesh(states) if streamed else None
    if not streamed:
      return _vmapped_round_jit(base, states, batches, prefix_tokens, prefix_loss_mask, anchors, ctx, lc=lc)
    size, sizes = step_sizes(round_needs(batches, lc, mesh=mesh), sizes)
    if mesh is not None:
      return _sharded_streamed_round_jit(base, states, batches, prefix_tokens, prefix_loss_mask, anchors, ctx,
                                         size, lc=lc, sizes=sizes, mesh=mesh)
    return _streamed_round_jit(base, states, batches, prefix_tokens, prefix_loss_mask, anchors, ctx, size, lc=lc,
                               sizes=sizes)
  if schedule is None:
    schedule = lane_schedule(np.asarray(batches.step_mask).sum(axis=1), lanes)
  waves = arrange(batches, schedule)
  size = None
  if streamed:  # one device
    size, sizes = step_sizes(round_needs(waves, lc, waves=True), sizes)
  return _lanes_round_jit(base, states, waves, schedule.client, schedule.first, schedule.last, prefix_tokens,
                          prefix_loss_mask, anchors, ctx, lc=lc, sizes=sizes if streamed else None, size=size)


def sequential_local_round(base, states: ClientStates, batches: ClientBatches, prefix_tokens, prefix_loss_mask,
                           anchors, ctx: RoundContext, *, lc: LocalConfig):
  """Debug path: the same round, training the clients one after another."""
  take = lambda tree, c: jax.tree.map(lambda x: x[c], tree)
  results = [
      _client_update_jit(base, take(states.adapters, c), take(states.opt_state, c), states.rng[c],
                         take(batches, c), prefix_tokens, prefix_loss_mask, take(anchors, c), ctx.warmup_steps,
                         ctx.lr_scale[c], lc=lc)
      for c in range(states.rng.shape[0])
  ]
  stack = lambda *xs: jnp.stack(xs)
  adapters, opt_state, rng, metrics = (jax.tree.map(stack, *[r[i] for r in results]) for i in range(4))
  return ClientStates(adapters, opt_state, rng), metrics


# ----------------------------------------------------------------------------------------------------
# Validation


def _client_validation(base, adapters, batches: ClientBatches, prefix_tokens, prefix_loss_mask, lc: LocalConfig):
  def step(carry, xs):
    (tokens, positions, segment_ids, loss_mask), real = xs
    inputs = model_lib.Inputs(tokens, positions, segment_ids, prefix_tokens)
    total, count = split_learning.loss_only(base, adapters, inputs, loss_mask, prefix_loss_mask, lc.split)
    return (carry[0] + jnp.where(real, total, 0.0), carry[1] + jnp.where(real, count, 0.0)), None

  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  (total, count), _ = jax.lax.scan(step, init, (tuple(batches[:4]), batches.step_mask))
  return total, count


@functools.partial(jax.jit, static_argnames=("lc",))
def validation_nll(base, adapters, batches: ClientBatches, prefix_tokens, prefix_loss_mask, lc: LocalConfig):
  """Per-client (NLL sum, label count) over a split's batches, for client-stacked adapters."""
  fn = functools.partial(_client_validation, lc=lc)
  return jax.vmap(fn, in_axes=(None, 0, 0, None, None))(base, adapters, batches, prefix_tokens, prefix_loss_mask)
