"""The Llama decoder as Flax NNX modules, and the pure functions over its split states that run it.

`Llama` holds the variables: token embeddings, the decoder layers (one `DecoderLayer` whose variables carry
a leading layer axis L), the final norm and the LM head (absent when the embeddings are tied). Each
projection is a `Projection` whose LoRA weights, when it is a target, are `Adapter` variables, so that

    graphdef, adapters, base = nnx.split(model, Adapter, ...)

separates what clients train from the frozen base in one call. `states(model)` gives both as pure dicts
(nested by module name, e.g. base["layers"]["self_attn"]["q_proj"]["kernel"] [L, D, O], adapters["layers"]
["self_attn"]["q_proj"]["lora_a"] [L, D, r]); every hot path (training, the streamed round, generation,
title scoring) takes these pytrees through plain jax.jit / vmap / vjp, and `merge` turns them back into a
module. The modules' own `__call__`s run the same functions on their variables.

One decoder-layer skeleton, `decoder_layer`, serves every way of running the model: it takes the
attention as a function of (q, k, v), so packed rows with a shared prefix (here), the stream of all
clients' tokens (federated/stream.py), the KV cache (generation.py) and title scoring against a cached
prompt (evaluation/likelihood.py) only supply their attention.

Activations: packed rows of tokens [R, T] plus an optional prompt prefix [P] shared by every row. Rows
attend to the whole prefix and, causally, to the tokens of their own segment. With P = 0 and one segment per
row this is exactly Hugging Face's `LlamaForCausalLM` with an attention mask. The client/server split
(split.py) runs `front`, `middle` and `back`; their composition is `forward`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fellrec_jax.model import kernels
from fellrec_jax.model import lora as lora_lib
from fellrec_jax.model import split as split_lib

Params = dict[str, Any]

ATTENTION_PROJECTIONS = lora_lib.ATTENTION_PROJECTIONS
MLP_PROJECTIONS = lora_lib.MLP_PROJECTIONS
PROJECTIONS = lora_lib.ALL_TARGETS
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
UNROLL_LAYERS = 8  # parts with at most this many layers are unrolled (run_layers)
# Dropout keys of a layer's projections: fold_in(layer key, index).
_PROJECTION_KEY = {name: i for i, name in enumerate(PROJECTIONS)}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama decoder (the fields of a Hugging Face `LlamaConfig` that change numbers)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # Extra rope parameters as sorted (key, value) pairs, e.g. (("factor", 8.0), ("rope_type", "llama3"), ...).
  rope_scaling: tuple[tuple[str, Any], ...] = ()
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  initializer_range: float = 0.02
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  pad_token_id: int | None = None
  # Compute dtype of activations and matmuls ("float32" or "bfloat16"); norms and softmax run in float32.
  dtype: str = "float32"

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    rope_type = self.rope_type
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise NotImplementedError(f"rope_type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")

  @property
  def rope_type(self) -> str:
    return dict(self.rope_scaling).get("rope_type", "default")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **changes) -> LlamaConfig:
    return dataclasses.replace(self, **changes)


block_of = lora_lib.block_of


def has_bias(cfg: LlamaConfig, name: str) -> bool:
  return cfg.attention_bias if name in ATTENTION_PROJECTIONS else cfg.mlp_bias


# ----------------------------------------------------------------------------------------------------
# Initialisation of the base (as Hugging Face; the adapters': lora.init_adapters, as PEFT)


def init_params(cfg: LlamaConfig, rng: jax.Array, param_dtype=jnp.float32) -> Params:
  """Random base state (pure dict): normal(0, initializer_range) projections and embeddings, norms 1."""
  d, L = cfg.hidden_size, cfg.num_layers
  shapes = lora_lib.projection_shapes(cfg)
  keys = jax.random.split(rng, len(shapes) + 2)
  normal = lambda key, shape: (cfg.initializer_range * jax.random.normal(key, shape)).astype(param_dtype)
  layers = {"input_layernorm": {"scale": jnp.ones((L, d), param_dtype)},
            "post_attention_layernorm": {"scale": jnp.ones((L, d), param_dtype)}, "self_attn": {}, "mlp": {}}
  for key, (name, shape) in zip(keys, shapes.items()):
    projection = {"kernel": normal(key, (L, *shape))}
    if has_bias(cfg, name):
      projection["bias"] = jnp.zeros((L, shape[1]), param_dtype)
    layers[block_of(name)][name] = projection
  params = {"embed_tokens": {"embedding": normal(keys[-2], (cfg.vocab_size, d))}, "layers": layers,
            "norm": {"scale": jnp.ones((d,), param_dtype)}}
  if not cfg.tie_word_embeddings:
    params["lm_head"] = {"kernel": normal(keys[-1], (d, cfg.vocab_size))}
  return params


# ----------------------------------------------------------------------------------------------------
# The modules


class Adapter(nnx.LoRAParam):
  """LoRA weights: the part of the model that clients train and the server aggregates."""


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32, as Hugging Face's LlamaRMSNorm."""

  def __init__(self, scale: jax.Array, eps: float):
    self.scale = nnx.Param(scale)
    self.eps = eps

  def __call__(self, x):
    return kernels.rms_norm(x, self.scale[...], self.eps)


class Projection(nnx.Module):
  """x @ kernel [in, out] (+ bias) (+ dropout(x) @ lora_a @ lora_b * scale when it is a LoRA target)."""

  def __init__(self, lcfg: lora_lib.LoraConfig, kernel, bias=None, lora_a=None, lora_b=None):
    self.lcfg = lcfg
    self.kernel = nnx.Param(kernel)
    self.bias = None if bias is None else nnx.Param(bias)
    self.lora_a = None if lora_a is None else Adapter(lora_a)
    self.lora_b = None if lora_b is None else Adapter(lora_b)

  def __call__(self, x, rng=None):
    params, adapter = states(self)
    return project(x, params, adapter or None, self.lcfg, rng)


def _projections(lcfg, names, params: Params, adapters: Params) -> dict[str, Projection]:
  return {name: Projection(lcfg, **params[name], **adapters.get(name, {})) for name in names}


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary embeddings over one sequence [T, D] (or rows [R, T, D])."""

  def __init__(self, cfg: LlamaConfig, lcfg: lora_lib.LoraConfig, params: Params, adapters: Params):
    self.cfg, self.lcfg = cfg, lcfg
    for name, projection in _projections(lcfg, ATTENTION_PROJECTIONS, params, adapters).items():
      setattr(self, name, projection)

  def __call__(self, x, positions, mask=None):
    """Causal (or `mask` [.., T, T]) attention output of x [.., T, D], projected back to [.., T, D]."""
    params, adapters = states(self)
    cos, sin = kernels.rope_tables(positions, self.cfg)
    q, k, v = qkv(x, params, adapters, cos, sin, self.cfg, self.lcfg)
    out = causal_attention(q, k, v, mask, self.cfg)
    return project(merge_heads(out, self.cfg), params["o_proj"], adapters.get("o_proj"), self.lcfg)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, lcfg: lora_lib.LoraConfig, params: Params, adapters: Params):
    self.lcfg = lcfg
    for name, projection in _projections(lcfg, MLP_PROJECTIONS, params, adapters).items():
      setattr(self, name, projection)

  def __call__(self, x):
    params, adapters = states(self)
    return mlp(x, params, adapters, self.lcfg)


class DecoderLayer(nnx.Module):
  """Pre-norm attention and MLP blocks with residuals (its variables may carry leading layer axes)."""

  def __init__(self, cfg: LlamaConfig, lcfg: lora_lib.LoraConfig, params: Params, adapters: Params):
    self.cfg, self.lcfg = cfg, lcfg
    self.input_layernorm = RMSNorm(params["input_layernorm"]["scale"], cfg.rms_norm_eps)
    self.self_attn = Attention(cfg, lcfg, params["self_attn"], adapters.get("self_attn", {}))
    self.post_attention_layernorm = RMSNorm(params["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
    self.mlp = MLP(cfg, lcfg, params["mlp"], adapters.get("mlp", {}))

  def __call__(self, x, positions, mask=None):
    """Hidden states [.., T, D] after this layer (causal attention, or `mask` [.., T, T])."""
    params, adapters = states(self)
    cos, sin = kernels.rope_tables(positions, self.cfg)
    attention = lambda q, k, v: (causal_attention(q, k, v, mask, self.cfg), None)
    return decoder_layer(x, params, adapters, attention, cos, sin, self.cfg, self.lcfg)[0]


class Llama(nnx.Module):
  """Embeddings, L stacked decoder layers, final norm and LM head, with LoRA adapters on `lcfg.targets`.

  `Llama(cfg, lcfg, rngs=nnx.Rngs(0))` initialises as Hugging Face (base) and PEFT (adapters) do;
  `merge(cfg, lcfg, base, adapters)` builds one from states (a checkpoint, a client's adapters).
  """

  def __init__(self, cfg: LlamaConfig, lcfg: lora_lib.LoraConfig, *, rngs: nnx.Rngs):
    self.config, self.lora_config = cfg, lcfg
    params, adapters = init_params(cfg, rngs.params()), lora_lib.init_adapters(cfg, lcfg, rngs.params())
    self.embed_tokens = Embedding(params["embed_tokens"]["embedding"])
    self.layers = DecoderLayer(cfg, lcfg, params["layers"], adapters["layers"])
    self.norm = RMSNorm(params["norm"]["scale"], cfg.rms_norm_eps)
    self.lm_head = Head(params["lm_head"]["kernel"]) if "lm_head" in params else None

  def __call__(self, inputs: Inputs, rng=None) -> jax.Array:
    """Float32 logits [R, T, V] of the rows (dropout on the adapters' inputs when `rng` is given)."""
    base, adapters = states(self)
    return forward(base, adapters, inputs, self.config, self.lora_config, rng)

  def layer(self, index: int) -> DecoderLayer:
    """Decoder layer `index` as a module of its own (a copy of that slice of the stacked variables)."""
    graphdef, state = nnx.split(self.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[index], state))


class Embedding(nnx.Module):
  """Token embeddings [V, D]."""

  def __init__(self, embedding):
    self.embedding = nnx.Param(embedding)

  def __call__(self, tokens):
    return self.embedding[...][tokens]


class Head(nnx.Module):
  """The LM head kernel [D, V] (absent when it is tied to the embeddings)."""

  def __init__(self, kernel):
    self.kernel = nnx.Param(kernel)

  def __call__(self, h):
    return h @ self.kernel[...]


def states(module: nnx.Module) -> tuple[Params, Params]:
  """(base, adapters) of a module as pure dicts of arrays: the pytrees the hot paths take."""
  adapters, base = nnx.state(module, Adapter, ...)
  return nnx.to_pure_dict(base), nnx.to_pure_dict(adapters)


def abstract_model(cfg: LlamaConfig, lcfg: lora_lib.LoraConfig) -> Llama:
  """The model's structure with shapes and dtypes only (nothing allocated)."""
  return nnx.eval_shape(lambda: Llama(cfg, lcfg, rngs=nnx.Rngs(0)))


def abstract_states(cfg: LlamaConfig, lcfg: lora_lib.LoraConfig = lora_lib.LoraConfig()) -> tuple[Params, Params]:
  """(base, adapters) as pure dicts of jax.ShapeDtypeStruct: what a checkpoint must fill."""
  adapters, base = nnx.state(abstract_model(cfg, lcfg), Adapter, ...)
  spec = lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype)
  return jax.tree.map(spec, nnx.to_pure_dict(base)), jax.tree.map(spec, nnx.to_pure_dict(adapters))


def merge(cfg: LlamaConfig, lcfg: lora_lib.LoraConfig, base: Params, adapters: Params) -> Llama:
  """The module holding these states (a pure base and adapters, e.g. one client's)."""
  graphdef, _, _ = nnx.split(abstract_model(cfg, lcfg), Adapter, ...)
  return nnx.merge(graphdef, adapters, base)


# ----------------------------------------------------------------------------------------------------
# The layer skeleton, over pure states


class Inputs(NamedTuple):
  """Token inputs of one forward pass (one client step)."""

  tokens: jax.Array  # [R, T] int32, packed rows
  positions: jax.Array  # [R, T] int32, position of each token in its example (prefix included)
  segment_ids: jax.Array  # [R, T] int32, 1..n for the examples of a row, 0 on padding
  prefix_tokens: jax.Array  # [P] int32, the prompt prefix shared by every example (P may be 0)


class Activations(NamedTuple):
  """Hidden states of the rows and of the shared prefix: what crosses the client/server boundary."""

  rows: jax.Array  # [R, T, D]
  prefix: jax.Array  # [P, D]


def plain_inputs(tokens, attention_mask=None, positions=None) -> Inputs:
  """Inputs for unpacked sequences: one example per row, padding given by `attention_mask`."""
  tokens = jnp.asarray(tokens, jnp.int32)
  mask = jnp.ones_like(tokens) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  return Inputs(tokens, jnp.asarray(positions, jnp.int32), mask, jnp.zeros((0,), jnp.int32))


def layer_rng(rng, index):
  """A dropout key (or kernels.DropoutKeys) folded with a layer's or a projection's index."""
  if rng is None:
    return None
  return rng.fold_in(index) if isinstance(rng, kernels.DropoutKeys) else jax.random.fold_in(rng, index)


def project(x, params: Params, adapter, lcfg: lora_lib.LoraConfig, rng=None):
  """x @ kernel (+ bias) + LoRA(x) for one projection; `adapter` is None, {lora_a, lora_b} or a
  kernels.StreamLora (every client's adapters for the tokens of a stream)."""
  dtype = x.dtype
  y = x @ params["kernel"].astype(dtype)
  if "bias" in params:
    y = y + params["bias"].astype(dtype)
  if adapter is None:
    return y
  if rng is not None and lcfg.dropout > 0.0:
    x = kernels.lora_dropout(x, rng, lcfg.dropout)
  if isinstance(adapter, kernels.StreamLora):
    return y + kernels.stream_lora_delta(x, adapter.a.astype(dtype), adapter.b.astype(dtype), adapter.clients,
                                         lcfg.scale)
  return y + kernels.lora_delta(x, adapter["lora_a"].astype(dtype), adapter["lora_b"].astype(dtype), lcfg.scale)


def _project_named(x, params, adapters, name, lcfg, rng):
  return project(x, params[name], adapters.get(name), lcfg, layer_rng(rng, _PROJECTION_KEY[name]))


def qkv(h, attn: Params, adapters: Params, cos, sin, cfg: LlamaConfig, lcfg, rng=None):
  """Rotated queries [.., T, K, G, H] and keys/values [.., T, K, H] of normed hidden states [.., T, D]."""
  K, G, H = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
  q, k, v = (_project_named(h, attn, adapters, name, lcfg, rng) for name in ("q_proj", "k_proj", "v_proj"))
  q = kernels.apply_rope(q.reshape(*q.shape[:-1], K * G, H), cos, sin)
  k = kernels.apply_rope(k.reshape(*k.shape[:-1], K, H), cos, sin)
  return q.reshape(*q.shape[:-2], K, G, H), k, v.reshape(*v.shape[:-1], K, H)


def merge_heads(out, cfg: LlamaConfig):
  """Attention output [.., T, K, G, H] as [.., T, N*H]."""
  return out.reshape(*out.shape[:-3], cfg.num_heads * cfg.head_dim)


def mlp(h, params: Params, adapters: Params, lcfg, rng=None):
  gate = _project_named(h, params, adapters, "gate_proj", lcfg, rng)
  up = _project_named(h, params, adapters, "up_proj", lcfg, rng)
  return _project_named(jax.nn.silu(gate) * up, params, adapters, "down_proj", lcfg, rng)


def causal_attention(q, k, v, mask, cfg: LlamaConfig):
  """Attention of one sequence or rows [.., T, ...] over themselves, causal unless `mask` [.., T, T]."""
  T = q.shape[-4]
  q_r, k_r, v_r = q.reshape(-1, *q.shape[-4:]), k.reshape(-1, *k.shape[-3:]), v.reshape(-1, *v.shape[-3:])
  mask = jnp.tril(jnp.ones((T, T), bool)) if mask is None else mask
  mask = jnp.broadcast_to(mask, (q_r.shape[0], T, T))
  return kernels.attend(q_r, [(k_r, v_r, mask, False)], cfg.head_dim ** -0.5).reshape(q.shape)


Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


def decoder_layer(x, layer: Params, adapters: Params, attention: Attend, cos, sin, cfg: LlamaConfig,
                  lcfg: lora_lib.LoraConfig, rng=None):
  """One decoder layer on hidden states [.., D]: (output, whatever `attention` returns beside its output).

  `attention(q [.., K, G, H], k [.., K, H], v)` gives the attended values [.., K, G, H] and an auxiliary
  value (e.g. an updated KV cache); everything else is the same for every way of running the model.
  """
  h = kernels.rms_norm(x, layer["input_layernorm"]["scale"], cfg.rms_norm_eps)
  attn_adapters = adapters.get("self_attn", {})
  q, k, v = qkv(h, layer["self_attn"], attn_adapters, cos, sin, cfg, lcfg, rng)
  out, aux = attention(q, k, v)
  x = x + _project_named(merge_heads(out, cfg), layer["self_attn"], attn_adapters, "o_proj", lcfg, rng)
  h = kernels.rms_norm(x, layer["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
  return x + mlp(h, layer["mlp"], adapters.get("mlp", {}), lcfg, rng), aux


# ----------------------------------------------------------------------------------------------------
# Packed rows with a shared prefix


class Context(NamedTuple):
  """Per-forward constants derived from the inputs: rotary tables and attention masks."""

  rows_cos: jax.Array  # [R, T, Dh]
  rows_sin: jax.Array
  prefix_cos: jax.Array  # [P, Dh]
  prefix_sin: jax.Array
  rows_mask: jax.Array  # [R, T, T] bool: same segment and causal
  prefix_mask: jax.Array  # [P, P] bool: causal


def context(inputs: Inputs, cfg: LlamaConfig) -> Context:
  rows_cos, rows_sin = kernels.rope_tables(inputs.positions, cfg)
  num_prefix = inputs.prefix_tokens.shape[0]
  prefix_cos, prefix_sin = kernels.rope_tables(jnp.arange(num_prefix, dtype=jnp.int32), cfg)
  seg = inputs.segment_ids
  T = seg.shape[1]
  causal = jnp.tril(jnp.ones((T, T), bool))
  rows_mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0) & causal
  prefix_mask = jnp.tril(jnp.ones((num_prefix, num_prefix), bool))
  return Context(rows_cos, rows_sin, prefix_cos, prefix_sin, rows_mask, prefix_mask)


def packed_layer(x: Activations, layer: Params, adapters: Params, ctx: Context, cfg: LlamaConfig,
                 lcfg: lora_lib.LoraConfig, rng=None) -> Activations:
  """One decoder layer over the prefix and the rows (which also attend to the prefix's keys)."""
  scale = cfg.head_dim ** -0.5
  rng_rows, rng_prefix = packed_dropout_keys(rng, x.rows.shape[:2], x.prefix.shape[0])

  def prefix_attention(q, k, v):
    return kernels.attend(q[None], [(k[None], v[None], ctx.prefix_mask[None], False)], scale)[0], (k, v)

  prefix, (k_p, v_p) = decoder_layer(x.prefix, layer, adapters, prefix_attention, ctx.prefix_cos,
                                     ctx.prefix_sin, cfg, lcfg, rng_prefix)

  def rows_attention(q, k, v):
    return kernels.attend(q, [(k_p, v_p, None, True), (k, v, ctx.rows_mask, False)], scale), None

  rows, _ = decoder_layer(x.rows, layer, adapters, rows_attention, ctx.rows_cos, ctx.rows_sin, cfg, lcfg,
                          rng_rows)
  return Activations(rows, prefix)


def packed_dropout_keys(rng, rows_shape: tuple[int, int], num_prefix: int):
  """(rows, prefix) kernels.DropoutKeys of one client's step from its layer key: prefix token p has id p,
  row slot (r, t) has id P + r*T + t, as the streamed round numbers them (stream.layout)."""
  if rng is None:
    return None, None
  R, T = rows_shape
  key = jnp.asarray(rng)[None]
  rows = kernels.DropoutKeys(key, jnp.zeros(rows_shape, jnp.int32),
                             num_prefix + jnp.arange(R * T, dtype=jnp.int32).reshape(R, T))
  return rows, kernels.DropoutKeys(key, jnp.zeros(num_prefix, jnp.int32), jnp.arange(num_prefix, dtype=jnp.int32))


def take_layer(tree, index):
  return jax.tree.map(lambda t: t[index], tree)


def slice_layers(tree, start: int, stop: int):
  """Layers [start, stop) of a layer-stacked pytree."""
  return jax.tree.map(lambda x: x[start:stop], tree)


def run_layers(layer_fn, x, layers: Params, adapter_layers: Params, start: int, stop: int, rng=None,
               remat: bool = False):
  """`layer_fn(x, layer, adapters, rng)` over layers [start, stop): unrolled up to UNROLL_LAYERS layers,
  else `lax.scan` over the layer axis. Each layer's dropout key is fold_in(rng, layer index).

  Unrolled, XLA keeps each layer's saved activations in their own buffers; a scan stacks them (a copy in
  and out of an [L, ...] buffer per layer), which costs ~15% of a CPU step at 4 layers.
  """
  if stop <= start:
    return x

  def body(x, xs):
    layer, layer_adapters, index = xs
    return layer_fn(x, layer, layer_adapters, layer_rng(rng, index)), None

  if remat:
    body = jax.checkpoint(body)
  if stop - start <= UNROLL_LAYERS:
    for index in range(start, stop):
      x, _ = body(x, (take_layer(layers, index), take_layer(adapter_layers, index), jnp.int32(index)))
    return x
  xs = (slice_layers(layers, start, stop), slice_layers(adapter_layers, start, stop), jnp.arange(start, stop))
  return jax.lax.scan(body, x, xs)[0]


def _run_packed(base, adapters, x: Activations, inputs: Inputs, layers: range, cfg, lcfg, rng, remat):
  ctx = context(inputs, cfg)
  layer_fn = lambda x, layer, a, r: packed_layer(x, layer, a, ctx, cfg, lcfg, r)
  return run_layers(layer_fn, x, base["layers"], adapters.get("layers", {}), layers.start, layers.stop, rng,
                    remat)


def embed(base: Params, tokens, cfg: LlamaConfig):
  """Token embeddings [..., D] in the compute dtype."""
  return base["embed_tokens"]["embedding"][tokens].astype(cfg.compute_dtype)


def final_norm(base: Params, h, cfg: LlamaConfig):
  return kernels.rms_norm(h, base["norm"]["scale"], cfg.rms_norm_eps)


def head_weight(base: Params) -> jax.Array:
  """The LM head kernel [D, V] (the transposed embeddings when they are tied)."""
  return base["lm_head"]["kernel"] if "lm_head" in base else base["embed_tokens"]["embedding"].T


def lm_logits(base: Params, h, cfg: LlamaConfig):
  """Float32 logits of final hidden states [..., D]."""
  logits = h.astype(cfg.compute_dtype) @ head_weight(base).astype(cfg.compute_dtype)
  return logits.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------
# The split: client front, server middle, client back (which layers are whose: split.py)


def front(base, adapters, inputs: Inputs, cfg, lcfg, k: int, rng=None, remat=False) -> Activations:
  """Client part before the server: embeddings and layers [0, k)."""
  x = Activations(embed(base, inputs.tokens, cfg), embed(base, inputs.prefix_tokens, cfg))
  return _run_packed(base, adapters, x, inputs, split_lib.front_layers(cfg, k), cfg, lcfg, rng, remat)


def middle(base, adapters, x: Activations, inputs: Inputs, cfg, lcfg, k: int, rng=None,
           remat=False) -> Activations:
  """Server part: layers [k, L-1) on the hidden states h_k received from the client."""
  return _run_packed(base, adapters, x, inputs, split_lib.server_layers(cfg, k), cfg, lcfg, rng, remat)


def back_hidden(base, adapters, x: Activations, inputs: Inputs, cfg, lcfg, rng=None,
                remat=False) -> Activations:
  """Client part after the server: the last layer and the final norm (hidden states before the head)."""
  x = _run_packed(base, adapters, x, inputs, split_lib.back_layers(cfg), cfg, lcfg, rng, remat)
  return Activations(final_norm(base, x.rows, cfg), final_norm(base, x.prefix, cfg))


def back(base, adapters, x: Activations, inputs: Inputs, cfg, lcfg, rng=None) -> jax.Array:
  """Client part after the server: last layer, final norm and head; float32 logits [R, T, V]."""
  return lm_logits(base, back_hidden(base, adapters, x, inputs, cfg, lcfg, rng).rows, cfg)


def forward_hidden(base, adapters, inputs: Inputs, cfg, lcfg, rng=None, remat=False) -> Activations:
  """All layers and the final norm, unsplit."""
  x = Activations(embed(base, inputs.tokens, cfg), embed(base, inputs.prefix_tokens, cfg))
  x = _run_packed(base, adapters, x, inputs, range(cfg.num_layers), cfg, lcfg, rng, remat)
  return Activations(final_norm(base, x.rows, cfg), final_norm(base, x.prefix, cfg))


def forward(base, adapters, inputs: Inputs, cfg, lcfg, rng=None) -> jax.Array:
  """Float32 logits [R, T, V] of the rows: what `LlamaForCausalLM` computes."""
  return lm_logits(base, forward_hidden(base, adapters, inputs, cfg, lcfg, rng).rows, cfg)
