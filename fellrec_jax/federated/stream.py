"""All clients' tokens of one step as one stream: the engine's fast path for a step of every client.

Per client and step the data holds rows [R, T] (docs/data.md), of which only part are tokens: padding
fills the rest, and the static R is the worst step of the run (a Games step of 8 examples fills 60% of
its slots). Here the real tokens of all C clients are gathered into one stream of static length, behind
each client's copy of the shared prompt prefix:

  stream = [prefix of client 0 | ... | prefix of client C-1 | the row tokens of all clients, in order]
           (C * P positions)                                     (N positions: a budget >= the most tokens
                                                                   any step of the round has)

Every token-wise computation (projections, MLP, norms, head and loss) runs once over the stream: one
matmul over all clients' tokens, no padding (PERFORMANCE.md, levers 2-3). LoRA stays per client: each
layer's adapters of all clients side by side ([D, C*r] and [C*r, O]), the token's own client's columns
selected by a mask. Attention keeps the data's rows: the non-empty rows of all clients (a budget Ra of
them) are gathered from the stream, each with its client's prefix keys/values, and their outputs read
back. The numbers are those of the per-client computation (model/llama.py, split_learning.py), rearranged; the
split between client and server is executed as there, on the stream's activations. LoRA dropout too: each
token's mask is drawn from its client's key and its id in the client's step (kernels.DropoutKeys), the
masks of the per-client computation.

Budgets are static (they shape the compiled step); `budgets` computes them from a round's batches on the
host, rounded up (to 1/16 of a power of two) so that rounds rarely recompile.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fellrec_jax.model import loss as loss_lib
from fellrec_jax.model import kernels
from fellrec_jax.model import llama as model_lib
from fellrec_jax.model import split as split_lib


CAUSAL_BLOCKS = 2


class Budgets(NamedTuple):
  """Static sizes of one micro-batch of all clients: row tokens in the stream, non-empty rows."""

  tokens: int
  rows: int


class Layout(NamedTuple):
  """Where every token of one step goes: the stream, the rows of attention, the loss (jit-built)."""

  tokens: jax.Array  # [S] int32 stream token ids (S = C*P + N)
  positions: jax.Array  # [S] int32 rotary positions
  columns: jax.Array  # [S, C] bool: the token's client (selects its LoRA columns)
  owners: jax.Array  # [S] int32: the token's client (its LoRA dropout key)
  dropout_ids: jax.Array  # [S] int32: its id in its client's step (llama.packed_dropout_keys' numbering)
  row_slots: jax.Array  # [Ra, T] int32: the stream index of each slot of each attention row (S: none)
  row_of_stream: jax.Array  # [N] int32: each row token's flat slot in [Ra * T]
  row_clients: jax.Array  # [Ra, C] float: the row's client, one-hot (gathers its prefix keys/values)
  row_mask: jax.Array  # [Ra, T, T] bool: same segment and causal
  starts: jax.Array  # [N] bool: the token is the first of its example
  weights: jax.Array  # [N] float32: its loss mask (0 on the budget's unused positions)
  token_clients: jax.Array  # [N, C] float: the row token's client, one-hot
  num_examples: jax.Array  # [C] float32: examples of each client in this step


def round_up(n: int) -> int:
  """n rounded up to 1/16 of its power of two (at most 6.25% more): few distinct budgets, few compiles."""
  if n <= 32:
    return max(n, 1)
  step = 2 ** (math.floor(math.log2(n)) - 4)
  return -(-n // step) * step


def step_needs(segment_ids, step_mask, accum_steps: int = 1) -> np.ndarray:
  """int [S, 2]: for batches [C, S, R, T] (or waves [W, V, R, T]), the row tokens and non-empty rows that
  each step's largest micro-batch holds over all its clients (host-side, numpy, not rounded)."""
  seg = np.asarray(segment_ids)
  valid = (seg > 0) & np.asarray(step_mask)[..., None, None]
  C, S, R, T = valid.shape
  valid = valid.reshape(C, S, accum_steps, R // accum_steps, T)
  tokens = valid.sum(axis=(0, 3, 4)).max(axis=1)
  rows = valid.any(axis=-1).sum(axis=(0, 3)).max(axis=1)
  return np.stack([tokens, rows], axis=-1).astype(np.int64)


def fit(needs) -> Budgets:
  """The budget holding needs [..., 2] (`step_needs`), rounded up."""
  most = np.asarray(needs).reshape(-1, 2).max(axis=0, initial=0)
  return Budgets(round_up(int(most[0])), round_up(int(most[1])))


def fit_groups(needs) -> tuple[Budgets, ...]:
  """`fit` of each group of needs [S, G, 2] (`group_needs`): one budget per group."""
  needs = np.asarray(needs)
  return tuple(fit(needs[:, g]) for g in range(needs.shape[1]))


def budgets(segment_ids, step_mask, accum_steps: int = 1) -> Budgets:
  """Budgets for batches [C, S, R, T] (or waves [W, V, R, T]): the most tokens and non-empty rows that
  any step's micro-batch has over all its clients, rounded up (host-side, numpy)."""
  return fit(step_needs(segment_ids, step_mask, accum_steps))


def group_bounds(num_clients: int, groups: int) -> list[tuple[int, int]]:
  """[start, stop) of `groups` contiguous, near-equal groups of clients (fewer when there are fewer clients)."""
  edges = np.linspace(0, num_clients, min(groups, num_clients) + 1).round().astype(int)
  return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def group_needs(segment_ids, step_mask, accum_steps: int = 1, groups: int = 1) -> np.ndarray:
  """int [S, G, 2]: `step_needs` of each group of clients (`group_bounds`), each group being its own stream."""
  seg, mask = np.asarray(segment_ids), np.asarray(step_mask)
  return np.stack([step_needs(seg[a:b], mask[a:b], accum_steps) for a, b in group_bounds(seg.shape[0], groups)],
                  axis=1)


def group_budgets(segment_ids, step_mask, accum_steps: int = 1, groups: int = 1) -> tuple[Budgets, ...]:
  """`budgets` of each group of clients (`group_bounds`), each group being its own stream."""
  return fit_groups(group_needs(segment_ids, step_mask, accum_steps, groups))


# ----------------------------------------------------------------------------------------------------
# Sizes: the steps of a round run at the smallest of a few planned budgets that holds them


def plan_sizes(needs, sizes: int, min_gain: float = 0.02) -> tuple[tuple[Budgets, ...], ...]:
  """At most `sizes` budgets (each one per group, ascending) for steps of needs [N, G, 2] (`group_needs` of
  all the steps to run), chosen so that running every step at the smallest one that holds it pads the
  least: the steps, ordered by their rounded tokens, are cut into classes minimising the sum over steps
  of their class's tokens (dynamic programming over the distinct rounded sizes). A size is added only
  while it cuts that sum by `min_gain` of the one-size sum: each size is one more compiled step."""
  needs = np.asarray(needs).reshape(-1, *np.shape(needs)[-2:])
  rounded = np.vectorize(round_up)(np.maximum(needs[..., 0], 1))  # [N, G]
  key = rounded.sum(axis=1)
  values, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
  n, k = len(values), max(1, min(sizes, len(values)))
  before = np.concatenate([[0], np.cumsum(counts)])  # steps with a key below values[i]
  cost = np.full((k + 1, n + 1), np.inf)  # cost[j, i]: the first i values cut into j classes
  cut = np.zeros((k + 1, n + 1), np.int64)
  cost[0, 0] = 0.0
  for j in range(1, k + 1):
    for i in range(1, n + 1):
      options = cost[j - 1, :i] + (before[i] - before[:i]) * values[i - 1]
      cut[j, i] = int(np.argmin(options))
      cost[j, i] = options[cut[j, i]]
  j = 1
  while j < k and cost[j, n] - cost[j + 1, n] >= min_gain * cost[1, n]:
    j += 1
  ends, i = [], n
  while i > 0:
    ends.append(i)
    i, j = cut[j, i], j - 1
  ladder, start = [], 0
  for end in sorted(ends):
    ladder.append(fit_groups(needs[(inverse >= start) & (inverse < end)]))
    start = end
  return tuple(ladder)


def size_of_steps(needs, ladder: tuple[tuple[Budgets, ...], ...]):
  """(int32 [S]: each step's size, the first budget of `ladder` that holds its needs [S, G, 2]; the ladder,
  its largest budget raised where a step needs more (one more compilation))."""
  needs = np.asarray(needs)
  top = tuple(Budgets(max(b.tokens, f.tokens), max(b.rows, f.rows))
              for b, f in zip(ladder[-1], fit_groups(needs)))
  ladder = ladder[:-1] + (top,)
  limits = np.asarray([[[b.tokens, b.rows] for b in rung] for rung in ladder])  # [K, G, 2]
  holds = np.all(needs[:, None] <= limits[None], axis=(2, 3))  # [S, K]
  return np.argmax(holds, axis=1).astype(np.int32), ladder


def layout(tokens, positions, segment_ids, loss_mask, real, prefix_tokens, budget: Budgets) -> Layout:
  """The stream layout of one micro-batch of rows [C, R, T] of all clients (`real` [C]: the step holds data)."""
  C, R, T = tokens.shape
  P, N, Ra = prefix_tokens.shape[0], budget.tokens, budget.rows
  valid = (segment_ids > 0) & real[:, None, None]
  # Row tokens in row order (so an example's tokens are consecutive), then unused budget positions.
  slot = jnp.nonzero(valid.reshape(-1), size=N, fill_value=C * R * T)[0]
  used = slot < C * R * T
  slot = jnp.where(used, slot, 0)
  client = slot // (R * T)
  rows = jnp.nonzero(valid.any(-1).reshape(-1), size=Ra, fill_value=C * R)[0]
  row_used = rows < C * R
  rank = jnp.zeros(C * R, jnp.int32).at[rows].set(jnp.arange(Ra, dtype=jnp.int32), mode="drop")
  rows = jnp.where(row_used, rows, 0)
  row_of_stream = jnp.where(used, rank[slot // T] * T + slot % T, Ra * T)
  stream_of_slot = jnp.full(C * R * T, C * P + N, jnp.int32).at[jnp.where(used, slot, C * R * T)].set(
      C * P + jnp.arange(N, dtype=jnp.int32), mode="drop")
  row_slots = jnp.where(row_used[:, None], stream_of_slot.reshape(C * R, T)[rows], C * P + N)
  seg_rows = jnp.where(row_used[:, None], (segment_ids * valid).reshape(C * R, T)[rows], 0)
  causal = jnp.tril(jnp.ones((T, T), bool))
  row_mask = (seg_rows[:, :, None] == seg_rows[:, None, :]) & (seg_rows[:, None, :] > 0) & causal
  flat = lambda x: x.reshape(-1)[slot]
  starts = (flat(positions) == P) & used
  token_clients = jax.nn.one_hot(client, C, dtype=jnp.float32) * used[:, None]
  clients_of_stream = jnp.concatenate([jnp.repeat(jnp.arange(C, dtype=jnp.int32), P), client.astype(jnp.int32)])
  dropout_ids = jnp.concatenate([jnp.tile(jnp.arange(P, dtype=jnp.int32), C), P + slot % (R * T)])
  return Layout(
      tokens=jnp.concatenate([jnp.tile(prefix_tokens, C), flat(tokens)]),
      positions=jnp.concatenate([jnp.tile(jnp.arange(P, dtype=jnp.int32), C), flat(positions)]),
      columns=jax.nn.one_hot(clients_of_stream, C, dtype=bool), owners=clients_of_stream,
      dropout_ids=dropout_ids.astype(jnp.int32),
      row_slots=row_slots, row_of_stream=row_of_stream,
      row_clients=jax.nn.one_hot(rows // R, C, dtype=jnp.float32) * row_used[:, None],
      row_mask=row_mask, starts=starts, weights=jnp.where(used, flat(loss_mask), 0.0).astype(jnp.float32),
      token_clients=token_clients, num_examples=jnp.sum(token_clients * starts[:, None], axis=0))


# ----------------------------------------------------------------------------------------------------
# Moving values between the stream and the rows: partial permutations, whose VJPs are gathers too


@jax.custom_vjp
def _take(x_NxF, index_M, inverse_N):
  """x[index] (index N: a zero row). `inverse` gives, for each row of x, its position in the result (M:
  none), so that the VJP is a gather rather than a scatter-add (each row of x is taken at most once)."""
  return jnp.concatenate([x_NxF, jnp.zeros((1, *x_NxF.shape[1:]), x_NxF.dtype)])[index_M]


def _take_fwd(x_NxF, index_M, inverse_N):
  return _take(x_NxF, index_M, inverse_N), (index_M, inverse_N)


def _take_bwd(residuals, g_MxF):
  index_M, inverse_N = residuals
  return _take(g_MxF, inverse_N, index_M), None, None


_take.defvjp(_take_fwd, _take_bwd)


# ----------------------------------------------------------------------------------------------------
# The model over the stream


def _stream_adapters(adapters, columns):
  """One layer's adapters of all clients ({block: {projection: {lora_a [C, D, r], lora_b [C, r, O]}}}) as
  a kernels.StreamLora per target projection, in the same nesting."""
  def stream_lora(ab):
    a, b = ab["lora_a"], ab["lora_b"]
    C, D, r = a.shape
    return kernels.StreamLora(a.transpose(1, 0, 2).reshape(D, C * r), b.reshape(C * r, b.shape[-1]), columns)

  return {block: {name: stream_lora(ab) for name, ab in projections.items()}
          for block, projections in adapters.items()}


def _layer(x_SxD, layer, adapters, lay: Layout, cos, sin, num_clients: int, cfg, lcfg, rng=None):
  """One decoder layer over the stream: prefixes attend causally to themselves, rows to their client's
  prefix and to their own segment. `rng`: the layer's kernels.DropoutKeys (None: no dropout)."""
  C, P = num_clients, (lay.tokens.shape[0] - lay.row_of_stream.shape[0]) // num_clients
  Ra, T = lay.row_slots.shape
  K, G, H = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
  prefix = lambda t: t[:C * P].reshape(C, P, *t.shape[1:])
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((P, P), bool)), (C, P, P))
  inverse = jnp.concatenate([jnp.full(C * P, Ra * T, jnp.int32), lay.row_of_stream])
  to_rows = lambda t: _take(t, lay.row_slots.reshape(-1), inverse).reshape(Ra, T, *t.shape[1:])
  by_row = lambda t: jnp.einsum("rc,cp...->rp...", lay.row_clients.astype(t.dtype), prefix(t))

  def attention(q, k, v):  # [S, K, G, H], [S, K, H] x2
    out_prefix = kernels.attend(prefix(q), [(prefix(k), prefix(v), causal, False)], H ** -0.5)
    out_rows = _causal_row_attention(to_rows(q), by_row(k), by_row(v), to_rows(k), to_rows(v), lay.row_mask,
                                     H ** -0.5)
    back = _take(out_rows.reshape(Ra * T, K, G, H), lay.row_of_stream, lay.row_slots.reshape(-1) - C * P)
    return jnp.concatenate([out_prefix.reshape(C * P, K, G, H), back]), None

  lora = _stream_adapters(adapters, lay.columns)
  return model_lib.decoder_layer(x_SxD, layer, lora, attention, cos, sin, cfg, lcfg, rng)[0]


def _causal_row_attention(q_RxTxKxGxH, kp_RxPxKxH, vp_RxPxKxH, k_RxTxKxH, v_RxTxKxH, mask_RxTxT, scale,
                          blocks: int = CAUSAL_BLOCKS):
  """Rows attending to their prefix and causally to themselves, in `blocks` blocks of queries: block j
  needs only the row's first (j+1)/blocks keys (the others are masked anyway), which skips a part of the
  [T, T] scores that grows with the number of blocks."""
  R, T = q_RxTxKxGxH.shape[:2]
  P = kp_RxPxKxH.shape[1]
  blocks = blocks if T % blocks == 0 else 1
  size = T // blocks
  outs = []
  for j in range(blocks):
    queries, keys = slice(j * size, (j + 1) * size), slice(0, (j + 1) * size)
    outs.append(kernels.attend(q_RxTxKxGxH[:, queries], [
        (kp_RxPxKxH, vp_RxPxKxH, jnp.ones((R, size, P), bool), False),
        (k_RxTxKxH[:, keys], v_RxTxKxH[:, keys], mask_RxTxT[:, queries, keys], False)], scale))
  return jnp.concatenate(outs, axis=1)


def run_layers(base, adapters, x_SxD, lay: Layout, layers: range, num_clients: int, cfg, lcfg,
               remat: bool = False, rng=None):
  """Decoder layers `layers` over the stream; adapters {"layers": ...} with leaves [C, L, ...]; `rng`:
  each client's dropout key [C, 2] for these layers (None: no dropout), folded as model_lib.run_layers does."""
  cos, sin = kernels.rope_tables(lay.positions, cfg)
  per_layer = jax.tree.map(lambda t: jnp.moveaxis(t, 1, 0), adapters["layers"])  # [L, C, ...]
  layer_fn = lambda x, layer, layer_adapters, layer_rng: _layer(x, layer, layer_adapters, lay, cos, sin,
                                                                num_clients, cfg, lcfg, layer_rng)
  keys = None if rng is None else kernels.DropoutKeys(rng, lay.owners, lay.dropout_ids)
  return model_lib.run_layers(layer_fn, x_SxD, base["layers"], per_layer, layers.start, layers.stop, keys,
                              remat=remat)


def stream_nll(base, h_SxD, lay: Layout, prefix_tokens, prefix_loss_mask, num_clients: int, cfg,
               chunk: int = 0):
  """Per client (sum of label-token NLLs [C], label-token count [C]) from final hidden states (as
  loss.packed_nll, client by client)."""
  C, P, D = num_clients, prefix_tokens.shape[0], h_SxD.shape[-1]
  rows = h_SxD[C * P:]
  previous = jnp.concatenate([jnp.zeros((1, D), rows.dtype), rows[:-1]])
  if P:
    last = h_SxD[:C * P].reshape(C, P, D)[:, -1]
    previous = jnp.where(lay.starts[:, None], lay.token_clients.astype(rows.dtype) @ last, previous)
  hidden, targets, weights = previous, lay.tokens[C * P:], lay.weights
  counts = lay.weights @ lay.token_clients
  if P > 1:
    prefix_weights = lay.num_examples[:, None] * prefix_loss_mask[1:].astype(jnp.float32)[None]  # [C, P-1]
    hidden = jnp.concatenate([hidden, h_SxD[:C * P].reshape(C, P, D)[:, :-1].reshape(-1, D)])
    targets = jnp.concatenate([targets, jnp.tile(prefix_tokens[1:], C)])
    weights = jnp.concatenate([weights, prefix_weights.reshape(-1)])
    counts = counts + jnp.sum(prefix_weights, axis=1)
  nll = loss_lib.weighted_token_nll(base, hidden, targets, weights, cfg, chunk)
  N = lay.weights.shape[0]
  totals = nll[:N] @ lay.token_clients
  if P > 1:
    totals = totals + jnp.sum(nll[N:].reshape(C, P - 1), axis=1)
  return totals, counts


def loss_and_grads(base, adapters, batch, real, prefix_tokens, prefix_loss_mask, sc, budget: Budgets, rng=None):
  """Per client (NLL sum [C], label count [C], adapter gradients [C, ...]) of one micro-batch of every
  client, through the explicit client/server split (as split_learning.loss_and_grads, all clients at once).

  batch: (tokens, positions, segment_ids, loss_mask), each [C, R, T]; real: [C] bool; rng: each client's
  dropout key of this micro-batch [C, 2] (None: no dropout), split as split_learning splits it, so that
  each client's masks are those of its own computation there.
  """
  cfg, lcfg, k = sc.model, sc.lora, sc.split_k
  C = real.shape[0]
  lay = layout(*batch, real, prefix_tokens, budget)
  rngs = [None] * 3 if rng is None else list(jnp.moveaxis(jax.vmap(lambda r: jax.random.split(r, 3))(rng), 1, 0))

  def client_front(a):
    x = model_lib.embed(base, lay.tokens, cfg)
    return run_layers(base, a, x, lay, split_lib.front_layers(cfg, k), C, cfg, lcfg, sc.remat, rngs[0])

  def server_middle(a, h_k):
    return run_layers(base, a, h_k, lay, split_lib.server_layers(cfg, k), C, cfg, lcfg, sc.remat, rngs[1])

  def client_back(a, h_last):
    h = run_layers(base, a, h_last, lay, split_lib.back_layers(cfg), C, cfg, lcfg, sc.remat, rngs[2])
    h = model_lib.final_norm(base, h, cfg)
    return stream_nll(base, h, lay, prefix_tokens, prefix_loss_mask, C, cfg, sc.loss_chunk)

  h_k, front_vjp = jax.vjp(client_front, adapters)  # clients -> server: h_k
  h_last, middle_vjp = jax.vjp(server_middle, adapters, h_k)  # server -> clients: h_{L-1}
  (totals, counts), back_vjp = jax.vjp(client_back, adapters, h_last)
  g_back, dh_last = back_vjp((jnp.ones_like(totals), jnp.zeros_like(counts)))  # clients -> server
  g_middle, dh_k = middle_vjp(dh_last)  # server -> clients: dL/dh_k
  (g_front,) = front_vjp(dh_k)
  grads = jax.tree.map(lambda *gs: gs[0] + gs[1] + gs[2], g_front, g_middle, g_back)
  return totals, counts, grads
