"""What one FELLRec client costs as a function of the split point k (the paper's resource figure).

A client with split point k holds and runs the embeddings, decoder layers [0, k), layer L-1, the final
norm and the LM head; the server runs layers [k, L-1). For each k this module gives:

- parameters the client holds (frozen base and LoRA) and the bytes of everything it holds: the base in
  its param dtype, and the LoRA adapters, AdamW's two moments and the gradients in float32;
- its training FLOPs per sample (flops.client_training_flops: an example of n tokens, plain computation)
  and their share of the whole model's;
- its peak memory for one training step of a batch [B, T], from XLA's buffer assignment of the compiled
  (never executed) client step: see `client_memory`;
- the bytes crossing the client/server boundary per sample (split_learning.boundary_bytes of one example
  of n tokens, without a shared prompt prefix);
- the server's share (its layers' parameters and training FLOPs) for context.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fellrec_jax.analysis import flops
from fellrec_jax.model import lora as lora_lib
from fellrec_jax.model import loss as loss_lib
from fellrec_jax.model import llama as model_lib
from fellrec_jax.model import split as split_lib
from fellrec_jax.federated import split_learning

FLOAT32_BYTES = 4
LORA_STATE_COPIES = 4  # the adapters, AdamW's two moments and the gradients, all float32


def client_abstract_state(cfg, lcfg, k: int, param_dtype):
  """(base, adapters) of the client as ShapeDtypeStructs: no memory is allocated."""
  ccfg = split_lib.client_config(cfg, k)
  key = jax.random.key(0)
  base = jax.eval_shape(functools.partial(model_lib.init_params, ccfg, param_dtype=param_dtype), key)
  adapters = jax.eval_shape(functools.partial(lora_lib.init_adapters, ccfg, lcfg), key)
  return base, adapters


def _tree_add(a, b):
  return jax.tree.map(jnp.add, a, b)


def client_step(base, adapters, inputs, loss_mask, h_last, dh_k, cfg, lcfg, k: int, loss_chunk: int = 0,
                remat: bool = False):
  """The client's part of one split training step (as split_learning.loss_and_grads), on its own.

  front (embeddings + layers [0, k)) -> h_k, sent; back (layer L-1, norm, head, loss) on the received
  h_last -> adapter gradients and dL/dh_last, sent; the VJP of front given the received dL/dh_k. The
  barriers keep that order (the server's replies only exist after the client's sends), so front's saved
  activations stay alive through back, as in a deployment. With no server layers (k = L-1), h_last = h_k
  and dL/dh_k = dL/dh_last, and `h_last`, `dh_k` are ignored. Returns (h_k, dL/dh_last, loss sum, grads).
  """
  ccfg = split_lib.client_config(cfg, k)
  no_prefix_mask = jnp.zeros((0,), jnp.float32)
  h_k, front_vjp = jax.vjp(lambda a: model_lib.front(base, a, inputs, ccfg, lcfg, k, None, remat), adapters)
  server = split_lib.has_server_layers(cfg, k)
  h_k, h_last = jax.lax.optimization_barrier((h_k, h_last)) if server else (h_k, h_k)

  def back_loss(a, h):
    hidden = model_lib.back_hidden(base, a, h, inputs, ccfg, lcfg, None, remat)
    return loss_lib.packed_nll(base, hidden, inputs, loss_mask, no_prefix_mask, ccfg, loss_chunk)

  (total, count), back_vjp = jax.vjp(back_loss, adapters, h_last)
  g_back, dh_last = back_vjp((jnp.ones_like(total), jnp.zeros_like(count)))
  dh_last, dh_k = jax.lax.optimization_barrier((dh_last, dh_k)) if server else (dh_last, dh_last)
  (g_front,) = front_vjp(dh_k)
  return h_k, dh_last, total, _tree_add(g_front, g_back)


def client_memory(cfg, lcfg, k: int, batch_size: int, seq_len: int, param_dtype=None, loss_chunk: int = 0,
                  remat: bool = False) -> dict[str, int]:
  """Bytes of the compiled client step (`client_step`) on a batch [B, T], from XLA's memory analysis.

  The step is lowered on ShapeDtypeStructs and compiled, never run, so any model size can be measured.
  Counted: arguments (the client's base and adapters, the batch, the received h_last and dL/dh_k),
  outputs (the sent h_k and dL/dh_last, the loss, the adapter gradients) and temporaries (saved
  activations, logits, intermediate gradients: XLA's buffer assignment, reused by liveness); peak =
  argument + output + temp - alias. Not counted: AdamW's moments and update (see `held_bytes`), LoRA
  dropout masks (dropout is off), the runtime's own overhead. Rows are plain sequences: no shared
  prefix, no padding. (`peak_memory_in_bytes` of the stats is not used: on XLA:CPU it came out as
  argument + output in small checks, without the temporaries.) The numbers are those of the default
  backend's compiler: XLA:CPU runs bfloat16 matmuls in float32 (it converts weights and activations),
  so a bfloat16 model measured on a CPU shows far more temporaries than it would on a GPU.
  """
  param_dtype = cfg.compute_dtype if param_dtype is None else jnp.dtype(param_dtype)
  base, adapters = client_abstract_state(cfg, lcfg, k, param_dtype)
  tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  inputs = model_lib.Inputs(tokens, tokens, tokens, jax.ShapeDtypeStruct((0,), jnp.int32))
  loss_mask = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32)
  hidden = model_lib.Activations(jax.ShapeDtypeStruct((batch_size, seq_len, cfg.hidden_size), cfg.compute_dtype),
                                 jax.ShapeDtypeStruct((0, cfg.hidden_size), cfg.compute_dtype))
  server = split_lib.has_server_layers(cfg, k)
  received = (hidden, hidden) if server else (None, None)
  step = functools.partial(client_step, cfg=cfg, lcfg=lcfg, k=k, loss_chunk=loss_chunk, remat=remat)
  stats = jax.jit(step).lower(base, adapters, inputs, loss_mask, *received).compile().memory_analysis()
  argument, output = stats.argument_size_in_bytes, stats.output_size_in_bytes
  temp, alias = stats.temp_size_in_bytes, stats.alias_size_in_bytes
  return {"argument": argument, "output": output, "temp": temp, "peak": argument + output + temp - alias}


def held_bytes(cfg, lcfg, k: int, param_dtype=None) -> dict[str, int]:
  """Bytes the client holds: the base in its param dtype; LoRA, AdamW's moments and gradients in float32."""
  param_dtype = cfg.compute_dtype if param_dtype is None else jnp.dtype(param_dtype)
  counts = flops.client_parameters(cfg, lcfg, k)
  base = counts["base"] * jnp.dtype(param_dtype).itemsize
  lora_state = counts["lora"] * FLOAT32_BYTES * LORA_STATE_COPIES
  return {"base": base, "lora_state": lora_state, "total": base + lora_state}


def boundary_bytes_per_sample(cfg, lcfg, k: int, tokens: int) -> int:
  """Bytes crossing the boundary for one example of `tokens` tokens (no shared prefix): 4 x [n, D]."""
  sc = split_learning.SplitConfig(model=cfg, lora=lcfg, split_k=k)
  return split_learning.boundary_bytes(rows=1, row_len=tokens, prefix_len=0, sc=sc)


def client_cost(cfg, lcfg, k: int, batch_size: int, seq_len: int, tokens_per_sample: int | None = None,
                param_dtype=None, loss_chunk: int = 0, remat: bool = False) -> dict:
  """One row of the table: the client's (and the server's) cost at split point k; see the module doc."""
  split_lib.check_split(cfg, k)
  n = seq_len if tokens_per_sample is None else tokens_per_sample
  server_layers = split_lib.num_server_layers(cfg, k)
  counts = flops.client_parameters(cfg, lcfg, k)
  layer_base = flops.base_parameter_counts(cfg)["layer"]
  layer_lora = flops.lora_parameters_per_layer(cfg, lcfg)
  total_flops = flops.training_flops(cfg, lcfg, n)
  client_flops = flops.client_training_flops(cfg, lcfg, n, k)
  held = held_bytes(cfg, lcfg, k, param_dtype)
  memory = client_memory(cfg, lcfg, k, batch_size, seq_len, param_dtype, loss_chunk, remat)
  return {
      "k": k, "client_layers": split_lib.num_client_layers(cfg, k), "server_layers": server_layers,
      "client_base_params": counts["base"], "client_lora_params": counts["lora"],
      "client_params": counts["base"] + counts["lora"],
      "client_base_share": counts["base"] / flops.total_parameters(cfg),
      "client_base_bytes": held["base"], "client_lora_state_bytes": held["lora_state"],
      "client_held_bytes": held["total"],
      "client_flops_per_sample": client_flops, "client_flops_share": client_flops / total_flops,
      "client_peak_bytes": memory["peak"], "client_argument_bytes": memory["argument"],
      "client_output_bytes": memory["output"], "client_temp_bytes": memory["temp"],
      "boundary_bytes_per_sample": boundary_bytes_per_sample(cfg, lcfg, k, n),
      "server_base_params": server_layers * layer_base, "server_lora_params": server_layers * layer_lora,
      "server_flops_per_sample": flops.training_flops(cfg, lcfg, n, layers=server_layers, head=False),
      "total_flops_per_sample": total_flops,
      "batch_size": batch_size, "seq_len": seq_len, "tokens_per_sample": n,
  }


def cost_table(cfg, lcfg, batch_size: int, seq_len: int, ks=None, **kwargs) -> list[dict]:
  """`client_cost` for every split point in ks (default 1 .. L-1)."""
  ks = range(1, cfg.num_layers) if ks is None else ks
  return [client_cost(cfg, lcfg, k, batch_size, seq_len, **kwargs) for k in ks]


def _si(x: float, unit: str = "") -> str:
  for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.2f} {prefix}{unit}"
  return f"{x:.0f} {unit}".rstrip()


def _binary(x: float) -> str:
  for scale, prefix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
    if abs(x) >= scale:
      return f"{x / scale:.2f} {prefix}"
  return f"{x:.0f} B"


MARKDOWN_COLUMNS = (
    ("k", lambda r: str(r["k"])),
    ("client layers", lambda r: str(r["client_layers"])),
    ("client base params", lambda r: _si(r["client_base_params"]) + f" ({r['client_base_share']:.0%})"),
    ("client LoRA params", lambda r: _si(r["client_lora_params"])),
    ("client holds", lambda r: _binary(r["client_held_bytes"])),
    ("client FLOPs/sample", lambda r: _si(r["client_flops_per_sample"]) + f" ({r['client_flops_share']:.0%})"),
    ("client peak (step)", lambda r: _binary(r["client_peak_bytes"])),
    ("boundary/sample", lambda r: _binary(r["boundary_bytes_per_sample"])),
    ("server layers", lambda r: str(r["server_layers"])),
    ("server base params", lambda r: _si(r["server_base_params"])),
    ("server FLOPs/sample", lambda r: _si(r["server_flops_per_sample"])),
)


def markdown(rows: list[dict]) -> str:
  """The table in Markdown (shares in parentheses: of the whole model's base parameters / FLOPs)."""
  lines = ["| " + " | ".join(name for name, _ in MARKDOWN_COLUMNS) + " |",
           "|" + "---:|" * len(MARKDOWN_COLUMNS)]
  lines += ["| " + " | ".join(cell(r) for _, cell in MARKDOWN_COLUMNS) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path, title: str | None = None) -> Path:
  """Four panels against k: parameters, FLOPs per sample, client memory, boundary bytes per sample."""
  ks = [r["k"] for r in rows]
  col = lambda name, scale=1.0: [r[name] / scale for r in rows]
  fig = Figure(figsize=(13, 3.4))
  panels = [
      ("parameters (M)", [("client base", col("client_base_params", 1e6)),
                          ("client LoRA", col("client_lora_params", 1e6)),
                          ("server base", col("server_base_params", 1e6))], True),
      ("training GFLOPs / sample", [("client", col("client_flops_per_sample", 1e9)),
                                    ("server", col("server_flops_per_sample", 1e9))], False),
      ("client memory (GiB)", [("held (base + LoRA, Adam, grads)", col("client_held_bytes", 2**30)),
                               ("compiled step peak", col("client_peak_bytes", 2**30))], False),
      ("boundary MiB / sample", [("h_k, h_L-1 and grads", col("boundary_bytes_per_sample", 2**20))], False),
  ]
  for i, (ylabel, curves, log) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    for label, values in curves:
      ax.plot(ks, values, marker="o", label=label)
    if log:
      ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel("split point k")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=120)
  return path
