"""Local training of every client in one jitted call: `vmap` over clients of a `lax.scan` over local steps.

Client state is one pytree with a leading client axis C (adapters, optimizer state, RNG key); the frozen
base is shared, unbatched. A client with fewer steps than others has its extra steps masked: they change
nothing, optimizer state included. Each step runs the explicit client/server split (split_learning.py),
accumulates gradients over `accum_steps` micro-batches of rows and normalises by the step's label-token
count, then applies AdamW with the reference's per-round linear schedule.

`sequential_local_round` trains the clients one by one with the same per-client function: a debug path
that must give the same numbers as the vmapped round.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fellrec_jax import model as model_lib
from fellrec_jax import optimizer as optimizer_lib
from fellrec_jax import split_learning


@dataclasses.dataclass(frozen=True)
class LocalConfig:
  """Static settings of local training (hashable: a jit static argument)."""

  split: split_learning.SplitConfig
  optimizer: optimizer_lib.OptimizerConfig
  accum_steps: int = 1  # micro-batches per optimizer step (rows per step must be a multiple)
  prox_mu: float = 0.0  # FedProx / Ditto proximal coefficient: mu/2 * ||theta - anchor||^2


class ClientStates(NamedTuple):
  """Per-client state, every leaf with a leading client axis."""

  adapters: Any
  opt_state: Any  # None when the optimizer is fresh each round
  rng: jax.Array  # [C, 2] PRNG keys


class ClientBatches(NamedTuple):
  """A round of one client's steps (or, with a leading C, of every client): arrays [S, R, T]."""

  tokens: jax.Array
  positions: jax.Array
  segment_ids: jax.Array
  loss_mask: jax.Array
  step_mask: jax.Array  # [S] bool


class RoundContext(NamedTuple):
  """Per-round values that are traced, not static (no recompilation between rounds)."""

  warmup_steps: jax.Array  # int32 scalar (the reference warms up in round 0 only)
  lr_scale: jax.Array  # [C] multiplier of each client's learning rate (heat.apply_to local lr)


class ClientMetrics(NamedTuple):
  train_loss: jax.Array  # mean of the real steps' losses (as the HF Trainer's train_loss)
  num_steps: jax.Array  # real optimizer steps
  label_tokens: jax.Array  # label tokens seen


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


def _micro_batches(tokens, positions, segment_ids, loss_mask, accum_steps: int):
  rows = tokens.shape[0]
  if rows % accum_steps:
    raise ValueError(f"rows per step ({rows}) must be a multiple of accum_steps ({accum_steps})")
  split = lambda x: x.reshape(accum_steps, rows // accum_steps, *x.shape[1:])
  return tuple(map(split, (tokens, positions, segment_ids, loss_mask)))


def step_loss_and_grads(base, adapters, batch, prefix_tokens, prefix_loss_mask, lc: LocalConfig, rng):
  """(NLL sum, label count, gradient sum) of one optimizer step, accumulated over micro-batches."""
  micro = _micro_batches(*batch, lc.accum_steps)

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
  (total, count, grads), _ = jax.lax.scan(accumulate, init, (micro, jnp.arange(lc.accum_steps)))
  return total, count, grads


def client_update(base, adapters, opt_state, rng, batches: ClientBatches, prefix_tokens, prefix_loss_mask,
                  anchor, warmup_steps, lr_scale, lc: LocalConfig):
  """One client's local training for a round: a scan over its steps; masked steps change nothing."""
  tx = optimizer_lib.transform(lc.optimizer)
  if lc.optimizer.fresh_each_round:
    opt_state = tx.init(adapters)
  total_steps = jnp.sum(batches.step_mask.astype(jnp.int32))
  rng, round_rng = jax.random.split(rng)
  use_dropout = lc.split.lora.dropout > 0

  def step(carry, xs):
    adapters, opt_state, count = carry
    tokens, positions, segment_ids, loss_mask, real, index = xs
    step_rng = jax.random.fold_in(round_rng, index) if use_dropout else None
    total, labels, grads = step_loss_and_grads(base, adapters, (tokens, positions, segment_ids, loss_mask),
                                               prefix_tokens, prefix_loss_mask, lc, step_rng)
    grads = jax.tree.map(lambda g: g / jnp.maximum(labels, 1.0), grads)
    if lc.prox_mu:
      grads = jax.tree.map(lambda g, p, a: g + lc.prox_mu * (p - a), grads, adapters, anchor)
    updates, new_opt_state = tx.update(grads, opt_state, adapters)
    lr = optimizer_lib.learning_rate(lc.optimizer, count, total_steps, warmup_steps) * lr_scale
    new_adapters = jax.tree.map(lambda p, u: p - (lr * u).astype(p.dtype), adapters, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(real, n, o), new, old)
    carry = (keep(new_adapters, adapters), keep(new_opt_state, opt_state), count + real.astype(jnp.int32))
    return carry, (jnp.where(real, total / jnp.maximum(labels, 1.0), 0.0), jnp.where(real, labels, 0.0))

  xs = (*batches[:4], batches.step_mask, jnp.arange(batches.step_mask.shape[0]))
  (adapters, opt_state, steps), (losses, labels) = jax.lax.scan(step, (adapters, opt_state, jnp.int32(0)), xs)
  metrics = ClientMetrics(jnp.sum(losses) / jnp.maximum(steps, 1), steps, jnp.sum(labels))
  return adapters, (None if lc.optimizer.fresh_each_round else opt_state), rng, metrics


def _round_fn(base, states: ClientStates, batches: ClientBatches, prefix_tokens, prefix_loss_mask, anchors,
              ctx: RoundContext, lc: LocalConfig):
  update = functools.partial(client_update, lc=lc)
  adapters, opt_state, rng, metrics = jax.vmap(update, in_axes=(None, 0, 0, 0, 0, None, None, 0, None, 0))(
      base, states.adapters, states.opt_state, states.rng, batches, prefix_tokens, prefix_loss_mask, anchors,
      ctx.warmup_steps, ctx.lr_scale)
  return ClientStates(adapters, opt_state, rng), metrics


# Client states are donated: their buffers are reused for the new states.
local_round = jax.jit(_round_fn, static_argnames=("lc",), donate_argnums=(1,))
local_round.__doc__ = """All clients' local training for one round (vmap over clients, scan over steps)."""

_client_update_jit = jax.jit(client_update, static_argnames=("lc",))


def sequential_local_round(base, states: ClientStates, batches: ClientBatches, prefix_tokens, prefix_loss_mask,
                           anchors, ctx: RoundContext, lc: LocalConfig):
  """Debug path: the same round, training the clients one after another."""
  num_clients = states.rng.shape[0]
  take = lambda tree, c: jax.tree.map(lambda x: x[c], tree)
  results = [
      _client_update_jit(base, take(states.adapters, c), take(states.opt_state, c), states.rng[c],
                         take(batches, c), prefix_tokens, prefix_loss_mask, take(anchors, c), ctx.warmup_steps,
                         ctx.lr_scale[c], lc=lc)
      for c in range(num_clients)
  ]
  stack = lambda *xs: jnp.stack(xs)
  adapters, opt_state, rng, metrics = (jax.tree.map(stack, *[r[i] for r in results]) for i in range(4))
  return ClientStates(adapters, opt_state, rng), metrics


def _client_validation(base, adapters, batches: ClientBatches, prefix_tokens, prefix_loss_mask, lc: LocalConfig):
  def step(carry, xs):
    tokens, positions, segment_ids, loss_mask, real = xs
    inputs = model_lib.Inputs(tokens, positions, segment_ids, prefix_tokens)
    total, count = split_learning.loss_only(base, adapters, inputs, loss_mask, prefix_loss_mask, lc.split)
    return (carry[0] + jnp.where(real, total, 0.0), carry[1] + jnp.where(real, count, 0.0)), None

  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  (total, count), _ = jax.lax.scan(step, init, (*batches[:4], batches.step_mask))
  return total, count


@functools.partial(jax.jit, static_argnames=("lc",))
def validation_nll(base, adapters, batches: ClientBatches, prefix_tokens, prefix_loss_mask, lc: LocalConfig):
  """Per-client (NLL sum, label count) over a split's batches, for client-stacked adapters."""
  fn = functools.partial(_client_validation, lc=lc)
  return jax.vmap(fn, in_axes=(None, 0, 0, None, None))(base, adapters, batches, prefix_tokens, prefix_loss_mask)
