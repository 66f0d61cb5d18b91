"""Defences at the split: Gaussian noise on the activations the client hands to the server, and DP-SGD on
the client's adapters (docs/privacy.md).

Boundary noise. Each token's hidden state h_k [D] is clipped to L2 norm `boundary_clip` (a step of the
client's computation, differentiated through), then Gaussian noise of standard deviation
`boundary_noise * boundary_clip / sqrt(D)` per coordinate is added before h_k leaves the client, so the
noise's expected norm is about `boundary_noise` times the clip norm. The server runs its layers on the noisy
states; the gradient it returns is applied to the clean clipped ones.

DP-SGD. Each example's gradient of its mean label NLL (over all of the client's adapters: front, server
and back layers) is clipped to L2 norm `dp_clip`; the clipped gradients are summed, Gaussian noise of
standard deviation `dp_noise * dp_clip` is added to every coordinate, and the sum is divided by the step's
examples. Per-example gradients come from running each example of the packed rows as a row of its own
(its row with the other segments masked to padding), through the same explicit split.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fellrec_jax.model import llama as model_lib

NOISE_KEY = 3  # the boundary noise's key: fold_in(step key, NOISE_KEY) (the dropout keys are split(key, 3))


@dataclasses.dataclass(frozen=True)
class Defences:
  """Static privacy settings of local training (all off by default)."""

  boundary_clip: float = 0.0  # per-token L2 bound of h_k before noise (0: no clipping)
  boundary_noise: float = 0.0  # noise norm relative to boundary_clip (0: none)
  dp_clip: float = 0.0  # DP-SGD per-example L2 bound of the adapters' gradient (0: DP-SGD off)
  dp_noise: float = 0.0  # DP-SGD noise multiplier sigma (noise std = sigma * dp_clip)
  examples_per_step: int = 0  # most examples in one optimizer step (the data's batch size; DP-SGD only)

  def __post_init__(self):
    for name in ("boundary_clip", "boundary_noise", "dp_clip", "dp_noise"):
      if getattr(self, name) < 0:
        raise ValueError(f"privacy.{name} must be >= 0, got {getattr(self, name)}")
    if self.boundary_noise > 0 and self.boundary_clip <= 0:
      raise ValueError("privacy.boundary_noise > 0 needs privacy.boundary_clip > 0 (the noise is relative to it)")
    if self.dp_noise > 0 and self.dp_clip <= 0:
      raise ValueError("privacy.dp_noise > 0 needs privacy.dp_clip > 0 (DP-SGD's noise is relative to it)")
    if self.dp_sgd and self.examples_per_step < 1:
      raise ValueError("DP-SGD needs examples_per_step >= 1 (the data's batch size)")

  @property
  def dp_sgd(self) -> bool:
    return self.dp_clip > 0

  @property
  def noisy_boundary(self) -> bool:
    return self.boundary_noise > 0

  @property
  def enabled(self) -> bool:
    return self.boundary_clip > 0 or self.noisy_boundary or self.dp_sgd


# ----------------------------------------------------------------------------------------------------
# Boundary noise


def clip_tokens(x, bound: float):
  """Each vector [..., D] scaled down to L2 norm at most `bound` (unchanged when bound is 0)."""
  if bound <= 0:
    return x
  norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
  return (x * jnp.minimum(1.0, bound / jnp.maximum(norm, 1e-12))).astype(x.dtype)


def add_token_noise(x, clip: float, noise: float, rng):
  """x + N(0, (noise * clip / sqrt(D))^2) per coordinate (x unchanged when noise is 0)."""
  if noise <= 0:
    return x
  std = noise * clip / x.shape[-1] ** 0.5
  return (x + std * jax.random.normal(rng, x.shape, jnp.float32)).astype(x.dtype)


def clip_boundary(h: model_lib.Activations, d: Defences) -> model_lib.Activations:
  return model_lib.Activations(clip_tokens(h.rows, d.boundary_clip), clip_tokens(h.prefix, d.boundary_clip))


def noise_boundary(h: model_lib.Activations, d: Defences, rng) -> model_lib.Activations:
  """The noisy states the server receives (rng: the step's key; none needed when there is no noise)."""
  if not d.noisy_boundary:
    return h
  if rng is None:
    raise ValueError("boundary noise needs a PRNG key")
  k_rows, k_prefix = jax.random.split(jax.random.fold_in(rng, NOISE_KEY))
  return model_lib.Activations(add_token_noise(h.rows, d.boundary_clip, d.boundary_noise, k_rows),
                               add_token_noise(h.prefix, d.boundary_clip, d.boundary_noise, k_prefix))


def release(h: model_lib.Activations, d: Defences, rng) -> model_lib.Activations:
  """Clipping then noise: what leaves the client."""
  return noise_boundary(clip_boundary(h, d), d, rng)


# ----------------------------------------------------------------------------------------------------
# DP-SGD


def global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_tree(tree, bound: float):
  """The pytree scaled down to global L2 norm at most `bound`."""
  scale = jnp.minimum(1.0, bound / jnp.maximum(global_norm(tree), 1e-12))
  return jax.tree.map(lambda g: (g * scale).astype(g.dtype), tree)


def noisy_clipped_sum(per_example, valid, clip: float, noise: float, rng):
  """sum_e clip(g_e) over the valid examples (leading axis E) + N(0, (noise * clip)^2) per coordinate."""
  clipped = jax.vmap(lambda g: clip_tree(g, clip))(per_example)
  summed = jax.tree.map(lambda g: jnp.tensordot(valid.astype(g.dtype), g, axes=1), clipped)
  leaves, treedef = jax.tree.flatten(summed)
  keys = jax.random.split(rng, len(leaves))
  noisy = [g + (noise * clip * jax.random.normal(k, g.shape, jnp.float32)).astype(g.dtype)
           for g, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, noisy)


def example_slots(inputs: model_lib.Inputs, max_examples: int):
  """(row [E], segment [E], valid [E]) of the step's examples, in order of their first token."""
  starts = (inputs.positions == inputs.prefix_tokens.shape[0]) & (inputs.segment_ids > 0)
  (flat,) = jnp.nonzero(starts.reshape(-1), size=max_examples, fill_value=0)
  valid = jnp.arange(max_examples) < jnp.sum(starts)
  T = inputs.tokens.shape[1]
  row = flat // T
  return row, inputs.segment_ids[row, flat % T], valid


def one_example(inputs: model_lib.Inputs, loss_mask, row, segment):
  """The example (row, segment) as a row of its own: the row's other segments become padding."""
  keep = inputs.segment_ids[row] == segment
  single = model_lib.Inputs(inputs.tokens[row][None], inputs.positions[row][None],
                            jnp.where(keep, segment, 0)[None], inputs.prefix_tokens)
  return single, jnp.where(keep, loss_mask[row], 0.0)[None]


def dp_loss_and_grads(loss_and_grads, base, adapters, inputs: model_lib.Inputs, loss_mask, prefix_loss_mask,
                      d: Defences, rng):
  """(NLL sum, label count, gradient) of one optimizer step under DP-SGD.

  `loss_and_grads(base, adapters, inputs, loss_mask, prefix_loss_mask, rng)` is the split's (per example).
  The gradient returned is the noisy mean of the clipped per-example gradients multiplied by the label
  count, so that the optimizer step's division by the label count leaves that mean.
  """
  row, segment, valid = example_slots(inputs, d.examples_per_step)
  keys = jax.random.split(jax.random.fold_in(rng, NOISE_KEY + 1), d.examples_per_step + 1)

  def example(r, s, key):
    single, mask = one_example(inputs, loss_mask, r, s)
    total, count, grads = loss_and_grads(base, adapters, single, mask, prefix_loss_mask, key)
    return total, count, jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)

  totals, counts, per_example = jax.vmap(example)(row, segment, keys[1:])
  totals, counts = jnp.where(valid, totals, 0.0), jnp.where(valid, counts, 0.0)
  summed = noisy_clipped_sum(per_example, valid, d.dp_clip, d.dp_noise, keys[0])
  labels = jnp.sum(counts)
  examples = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  return jnp.sum(totals), labels, jax.tree.map(lambda g: g * (labels / examples), summed)


def from_config(config) -> Defences:
  """The run's defences from its `privacy` config section (none when the config has no such section)."""
  p = config.get("privacy")
  if p is None:
    return Defences()
  return Defences(boundary_clip=p.boundary_clip, boundary_noise=p.boundary_noise, dp_clip=p.dp_clip,
                  dp_noise=p.dp_noise, examples_per_step=config.data.batch_size)
