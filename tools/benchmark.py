"""Throughput of a federated round: ours (one jitted, vmapped call) against the PyTorch way (transformers
LlamaForCausalLM + PEFT LoRA, clients one after another over one base model), same work on both sides.

  python tools/benchmark.py --quick                 # 8 clients on the CPU preset, LoRA dropout 0 and 0.05
  python tools/benchmark.py --quick --preset default  # configs/default.py's round against a reference-style loop
  python tools/benchmark.py --out bench.json        # the sweep: clients 1/8/64, then k = 1..L-1 at 8 clients
  python tools/benchmark.py --preset gpu1b --clients 16,32 --out bench.json   # tools/gpu_benchmark.sh

Both sides train on the same Games records (--data, read at run time), tokenized by our BPE, with the
same model config and base weights (shared through a saved checkpoint when small), the same initial
LoRA (r=8 on q,v; --lora_dropout on both sides, 0.05 by default as the reference), the same examples in
the same steps (B per client step; the step assignment is our batch plan's shuffle), the same loss
(train_on_inputs=True: every token after the first, mean over a step's label tokens) and AdamW (fresh per client per round, linear schedule, global
norm clipping at 1.0, as the reference's Trainer). Batches are prepared before timing on both sides.
The torch side pads each batch to its longest example rounded up to a multiple of 8, as the reference's
DataCollatorForSeq2Seq(pad_to_multiple_of=8); ours packs the suffixes after the shared prompt prefix into
rows (docs/data.md) and streams them, each step at the smallest of --stream_sizes token budgets planned
over the round (as a run plans them over its rounds). Each side runs in its own subprocess (peak RSS is
per side); one round is the warm-up (it includes our compilation), then --reps rounds are timed and the
median is reported (on a CPU in alternating blocks of --block rounds, each turn starting with --rewarm
untimed rounds).

Counted: samples = training examples processed per round; tokens = their real (non-pad) tokens, prefix
included; model FLOPs per sample = fellrec_jax.analysis.flops.training_flops of the plain computation (see there
for how attention is counted); MFU = samples/s x FLOPs/sample / the matmul peak measured in this run.
The first round's per-client mean training losses of both sides are printed: they agree when the work
is the same (weights are shared when --share_weights) and there is no dropout (each side draws its own
masks).

`--preset default` mirrors configs/default.py instead: its tiny model (d=128, 4 layers, its 2,000-token
BPE), LoRA r=16 (alpha 16) on all seven projections, B=16, no LM-head chunks, one stream, its
clients_per_chunk (2 lanes) and its 5 clients, against a reference-style PyTorch loop: the reference's
HF Trainer batches each client's examples grouped by length (`group_by_length`), so that side's steps hold
the same examples per client but not per step (losses then differ slightly).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PRESETS = {
    # PERFORMANCE.md's CPU case; GQA (4 query heads, 2 key/value heads), SwiGLU width 688 (8/3 d, /16).
    "cpu": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=2,
                vocab_size=8192, dtype="float32", split_k=2),
    # ~1.1B parameters (TinyLlama's shape), bfloat16 compute, float32 adapters and optimizer state.
    "gpu1b": dict(hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4,
                  vocab_size=32000, dtype="bfloat16", split_k=11),
    # Seconds on a CPU: checks the script end to end (the GPU path included, with --preset tiny --dtype ...).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
                 vocab_size=8192, dtype="float32", split_k=1),
    # configs/default.py's tiny model (its vocabulary is its tokenizer's, at most 2,000 tokens).
    "default": dict(hidden_size=128, intermediate_size=344, num_layers=4, num_heads=4, num_kv_heads=2,
                    vocab_size=128, dtype="float32", split_k=2),
}

# The run settings of a preset besides its model; a value given on the command line wins.
RUN_DEFAULTS = dict(tokenizer_vocab=8192, lora_rank=8, lora_alpha=16.0, lora_targets=("q_proj", "v_proj"),
                    batch_size=8, lanes=16, stream_groups=2, loss_chunk=512, quick_clients=8,
                    group_by_length=False, stream_sizes=4)
PRESET_RUNS = {
    "default": dict(tokenizer_vocab=2000, lora_rank=16, lora_targets=ALL_PROJECTIONS, batch_size=16, lanes=2,
                    stream_groups=1, loss_chunk=0, quick_clients=5, group_by_length=True),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="only the 8-client case at the preset's k (CPU: minutes)")
  p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  p.add_argument("--dtype", default="", help="override the preset's compute dtype (float32 | bfloat16)")
  p.add_argument("--data", default=str(ROOT.parent / "shared/data/games_bigrec"),
                 help="BIGRec directory with train.json; the synthetic dataset when it does not exist")
  p.add_argument("--clients", default="1,8,64", help="client counts of the sweep")
  p.add_argument("--steps", default="", help="optimizer steps per client, per client count "
                 "(default: 8 for 1 client, 4 for 2-16, 2 above)")
  p.add_argument("--ks", default="all", help="split points of the k sweep at 8 clients ('all': 1..L-1, '' none)")
  p.add_argument("--batch_size", type=int, default=None, help="examples per client step (B; preset's: 8, "
                 "default 16)")
  p.add_argument("--lora_dropout", type=_dropout_rate, default=0.05, help="LoRA dropout on both sides (the "
                 "reference's 0.05); --quick also measures 0")
  p.add_argument("--row_len", type=int, default=0, help="our row length T (0: longest suffix, multiple of 16)")
  p.add_argument("--lanes", type=int, default=None, help="our clients trained at once when there are more "
                 "(preset's: 16; default 2, its clients_per_chunk)")
  p.add_argument("--devices", type=int, default=1, help="our client state sharded over this many devices (mesh "
                 "clients axis; each streams its own clients); on a CPU, XLA host devices. Cases whose client "
                 "count it does not divide, or that use lanes, run on one")
  p.add_argument("--stream_groups", type=int, default=None, help="our clients' tokens as this many independent "
                 "streams per step (training.LocalConfig.stream_groups; preset's: 2, default 1)")
  p.add_argument("--stream_sizes", type=int, default=None, help="our streamed steps run at the smallest of this "
                 "many budgets that holds them, planned over the round as a run plans them (fed.stream_sizes; "
                 "default 4; 1: every step at the round's largest)")
  p.add_argument("--loss_chunk", type=int, default=None, help="our positions per LM-head chunk (0: all; preset's: "
                 "512, which ran 4%% faster than 1024 on a 2-core CPU; default 0)")
  p.add_argument("--reps", type=int, default=4, help="timed rounds per side and case (the median is reported)")
  p.add_argument("--block", type=int, default=2, help="CPU: timed rounds a side runs in a row before the other "
                 "side's turn (blocks in ABBA order, so that both sides see the same drift of the machine)")
  p.add_argument("--rewarm", type=int, default=1, help="CPU: untimed rounds a side runs when its turn starts: "
                 "on this VM a process idle for seconds runs its next round up to 25%% slower (docs/performance.md)"
                 "; --block 1 --rewarm 0 alternates single rounds")
  p.add_argument("--learning_rate", type=float, default=1e-3)
  p.add_argument("--warmup_steps", type=int, default=2)
  p.add_argument("--cutoff_len", type=int, default=512)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--share_weights", default="auto", choices=("auto", "yes", "no"),
                 help="both sides load one saved checkpoint (auto: below 200M parameters)")
  p.add_argument("--sides", default="jax,torch", help="which sides to run")
  p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: the CPU count)")
  p.add_argument("--xla_flags", default="auto", help="XLA_FLAGS for our side ('auto': on a CPU "
                 "--xla_cpu_prefer_vector_width=512, i.e. AVX-512 for XLA's own loops; -2..3%% of a step)")
  p.add_argument("--omp_wait_policy", default="", help="OMP_WAIT_POLICY for the torch side (default: torch's "
                 "own; PASSIVE makes its threads sleep at barriers, which helps only when other processes load "
                 "the CPU and cost it 4%% here when they do not)")
  p.add_argument("--hugepages", default="yes", choices=("yes", "no"),
                 help="both sides: GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages for large "
                 "allocations: fewer page faults on fresh activation buffers)")
  p.add_argument("--workdir", default="", help="where the tokenizer, data and checkpoint go (default: a temp dir)")
  p.add_argument("--out", default="", help="write the results as JSON")
  p.add_argument("--table", default="", help="also write the printed table to this file")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--spec", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  run_settings = {**RUN_DEFAULTS, **PRESET_RUNS.get(args.preset, {})}
  for name, value in run_settings.items():
    if getattr(args, name, None) is None:
      setattr(args, name, value)
  return args


def _dropout_rate(text: str) -> float:
  rate = float(text)
  if not 0.0 <= rate < 1.0:
    raise argparse.ArgumentTypeError(f"--lora_dropout must be in [0, 1), got {text}")
  return rate


def length_grouped(indices, lengths, batch_size: int, seed: int) -> list[list[int]]:
  """Batches of `indices` as the HF Trainer's group_by_length samples them (LengthGroupedSampler): a
  seeded shuffle, megabatches of min(n // (4 B), 50) batches each sorted by length (longest first), the
  longest megabatch's first; then split into batches of B."""
  indices = list(np.random.default_rng(seed).permutation(np.asarray(indices)))
  mult = max(1, min(len(indices) // (batch_size * 4), 50))
  size = mult * batch_size
  mega = [sorted(indices[i:i + size], key=lambda j: -lengths[j]) for i in range(0, len(indices), size)]
  first = max(range(len(mega)), key=lambda m: lengths[mega[m][0]])
  mega[0][0], mega[first][0] = mega[first][0], mega[0][0]
  flat = [int(i) for m in mega for i in m]
  return [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)]


def default_steps(clients: int) -> int:
  return 8 if clients == 1 else 4 if clients <= 16 else 2


# ----------------------------------------------------------------------------------------------------
# Data and model, prepared once by the parent process


def load_records(data_dir: Path, workdir: Path):
  """The Games dataset if present, else the synthetic one (noted in the results)."""
  from fellrec_jax.data.dataset import load_dataset
  if (data_dir / "train.json").is_file():
    return load_dataset(data_dir), str(data_dir)
  from configs import data as data_config
  from fellrec_jax.data import synthetic
  print(f"note: {data_dir}/train.json not found: using the synthetic dataset", flush=True)
  return synthetic.generate(data_config.get_synthetic_config()), "synthetic"


def prepare(args, workdir: Path) -> dict:
  """Tokenizer, encoded examples, model config (and checkpoint), initial adapters: files in workdir."""
  from fellrec_jax.data import batching
  from fellrec_jax.model import hf_interop
  from fellrec_jax.data import prompts
  from fellrec_jax.model import lora as lora_lib
  from fellrec_jax.model import llama as model_lib
  from fellrec_jax.data import tokenizer as tok_lib
  preset = dict(PRESETS[args.preset])
  dtype = args.dtype or preset.pop("dtype")
  preset.pop("dtype", None)
  split_k = preset.pop("split_k")
  dataset, source = load_records(Path(args.data), workdir)
  tokenizer = tok_lib.load_or_train_tokenizer(tokenizer_path="", dataset=dataset, vocab_size=args.tokenizer_vocab,
                                              save_dir=workdir / "tokenizer")
  examples = [prompts.encode_example(tokenizer, r, cutoff_len=args.cutoff_len, train_on_inputs=True)
              for r in dataset.train]
  prefix_ids, prefix_mask = batching.shared_prefix(examples)
  vocab = max(preset.pop("vocab_size"), -(-len(tokenizer) // 128) * 128)
  cfg = model_lib.LlamaConfig(vocab_size=vocab, head_dim=preset["hidden_size"] // preset["num_heads"],
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tok_lib.pad_id(tokenizer), dtype=dtype, **preset)
  lcfg = lora_lib.LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=0.0,
                             targets=tuple(args.lora_targets))
  hf_dir = workdir / "hf"
  from fellrec_jax.analysis import flops as flops_lib
  share = args.share_weights == "yes" or (args.share_weights == "auto" and flops_lib.total_parameters(cfg) < 2e8)
  if share:
    import jax
    hf_interop.save_llama(hf_dir, cfg, model_lib.init_params(cfg, jax.random.PRNGKey(args.seed)))
  else:
    hf_dir.mkdir(parents=True, exist_ok=True)
    hf_interop.config_to_hf(cfg).save_pretrained(str(hf_dir))  # config only: each side draws its weights
  adapters = initial_adapters(cfg, lcfg, args.seed)
  ids = np.concatenate([e[0] for e in examples]).astype(np.int32)
  offsets = np.cumsum([0] + [len(e[0]) for e in examples])
  np.savez(workdir / "data.npz", ids=ids, offsets=offsets, prefix_ids=prefix_ids, prefix_mask=prefix_mask,
           **{"lora/" + "/".join(path): v for path, v in _flat_items(adapters)})
  return {"source": source, "hf_dir": str(hf_dir), "shared_weights": bool(share), "dtype": dtype,
          "split_k": split_k, "config": {k: getattr(cfg, k) for k in (
              "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "head_dim")},
          "lora": {"rank": lcfg.rank, "alpha": lcfg.alpha, "targets": list(lcfg.targets)},
          "num_records": len(examples), "prefix_len": int(len(prefix_ids)), "tokenizer_size": len(tokenizer),
          "pad_id": int(tok_lib.pad_id(tokenizer)), "parameters": flops_lib.total_parameters(cfg)}


def _flat_items(tree: dict, path=()):
  """(path, leaf) of a nested dict."""
  for key, value in tree.items():
    yield from _flat_items(value, path + (key,)) if isinstance(value, dict) else [(path + (key,), value)]


def initial_adapters(cfg, lcfg, seed: int) -> dict:
  """PEFT's initialisation (lora_a ~ U(+-1/sqrt(in)), lora_b = 0) as a numpy adapter state, [L, in, r] and
  [L, r, out]."""
  from fellrec_jax.model import lora as lora_lib
  rs = np.random.default_rng([seed, 11])
  layers = {}
  for name in lcfg.targets:
    fan_in, fan_out = lora_lib.projection_shapes(cfg)[name]
    bound = 1.0 / np.sqrt(fan_in)
    layers.setdefault(lora_lib.block_of(name), {})[name] = {
        "lora_a": rs.uniform(-bound, bound, (cfg.num_layers, fan_in, lcfg.rank)).astype(np.float32),
        "lora_b": np.zeros((cfg.num_layers, lcfg.rank, fan_out), np.float32)}
  return {"layers": layers}


def client_steps(args, num_records: int, prefix_len: int, clients: int, steps: int, examples):
  """Examples of each client (consecutive records, wrapping around) and its steps (the plan's shuffle)."""
  from fellrec_jax.data import batching
  per_client = steps * args.batch_size
  assignment = [[(c * per_client + i) % num_records for i in range(per_client)] for c in range(clients)]
  client_examples = [[examples[i] for i in a] for a in assignment]
  plan = batching.make_plan(client_examples, prefix_len=prefix_len, batch_size=args.batch_size,
                            local_epochs=1, seed=args.seed, num_rounds=1, row_len=args.row_len)
  step_examples = [[[a[i] for i in idx] for idx in batching.step_indices(plan, 0, c)]
                   for c, a in enumerate(assignment)]
  if args.group_by_length:  # the reference-style side: the same examples per client, grouped by length
    lengths = {i: len(examples[i][0]) for a in assignment for i in a}
    step_examples = [length_grouped(a, lengths, args.batch_size, args.seed + c) for c, a in enumerate(assignment)]
  return assignment, step_examples, plan


def load_examples(workdir: Path):
  data = np.load(workdir / "data.npz")
  ids, offsets = data["ids"], data["offsets"]
  examples = [ids[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
  adapters = {}
  for key in data.files:
    if key.startswith("lora/"):
      *modules, leaf = key.split("/")[1:]
      node = adapters
      for module in modules:
        node = node.setdefault(module, {})
      node[leaf] = data[key]
  return examples, data["prefix_ids"], data["prefix_mask"], adapters


def cpu_seconds() -> float:
  """User + system CPU time of this process so far (all its threads)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def rss_mb() -> float:
  """Peak resident set size of this process so far (MiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ----------------------------------------------------------------------------------------------------
# Workers (each in its own process)


def worker_peak(spec: dict) -> dict:
  """Matmul peak: jax (and torch) float32 on CPU, bfloat16 on a GPU; best of several runs."""
  import jax
  import jax.numpy as jnp
  gpu = jax.default_backend() != "cpu"
  n = 8192 if gpu else 2048
  dtype = jnp.bfloat16 if gpu else jnp.float32
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, a).block_until_ready()
  times = []
  for _ in range(7):
    start = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - start)
  out = {"jax": 2 * n**3 / min(times), "n": n, "dtype": str(jnp.dtype(dtype)), "backend": jax.default_backend(),
         "device": str(jax.devices()[0].device_kind)}
  try:
    import torch
    torch.set_num_threads(spec["threads"])
    dev = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    x = torch.randn(n, n, dtype=torch.bfloat16 if gpu else torch.float32, device=dev)
    x @ x
    ts = []
    for _ in range(7):
      if dev == "cuda":
        torch.cuda.synchronize()
      start = time.perf_counter()
      x @ x
      if dev == "cuda":
        torch.cuda.synchronize()
      ts.append(time.perf_counter() - start)
    out["torch"] = 2 * n**3 / min(ts)
  except Exception as error:  # the peak of record is jax's
    out["torch_error"] = repr(error)
  return out


def jax_side(spec: dict):
  """(one_round, summary) of our side: one call of training.local_round per round."""
  import jax
  import jax.numpy as jnp
  from fellrec_jax.data import batching
  from fellrec_jax.federated import training
  from fellrec_jax.model import hf_interop
  from fellrec_jax.federated import optimizer
  from fellrec_jax.federated import split_learning
  from fellrec_jax.model import lora as lora_lib
  from fellrec_jax.model import llama as model_lib
  workdir = Path(spec["workdir"])
  examples, prefix_ids, prefix_mask, init = load_examples(workdir)
  cfg = hf_interop.load_config(spec["hf_dir"], dtype=spec["dtype"])
  param_dtype = jnp.dtype(spec["dtype"])
  if spec["shared_weights"]:
    base = hf_interop.load_params(spec["hf_dir"], cfg, param_dtype=param_dtype)
  else:
    base = model_lib.init_params(cfg, jax.random.PRNGKey(spec["seed"]), param_dtype=param_dtype)
  base = jax.device_put(base)
  lcfg = lora_lib.LoraConfig(rank=spec["lora"]["rank"], alpha=spec["lora"]["alpha"], dropout=spec["lora_dropout"],
                             targets=tuple(spec["lora"]["targets"]))
  client_examples = [[(examples[i], _label_mask(len(examples[i]))) for i in a] for a in spec["assignment"]]
  plan = batching.make_plan(client_examples, prefix_len=len(prefix_ids), batch_size=spec["batch_size"],
                            local_epochs=1, seed=spec["seed"], num_rounds=1, row_len=spec["row_len"])
  batches = jax.device_put(training.batches_from(batching.round_batches(plan, 0)))
  opt = optimizer.OptimizerConfig(learning_rate=spec["learning_rate"], warmup_steps=spec["warmup_steps"])
  lc = training.LocalConfig(split_learning.SplitConfig(cfg, lcfg, spec["k"], spec["loss_chunk"]), opt,
                             stream_groups=spec["stream_groups"])
  C = len(spec["assignment"])
  ctx = training.RoundContext(jnp.int32(spec["warmup_steps"]), jnp.ones(C, jnp.float32))
  stacked = jax.tree.map(lambda x: np.broadcast_to(x, (C, *x.shape)), init)
  prefix = (jnp.asarray(prefix_ids, jnp.int32), jnp.asarray(prefix_mask, jnp.float32))
  lanes = spec["lanes"] if C > spec["lanes"] else 0
  devices = spec.get("devices", 1)
  put = lambda tree: tree
  if devices > 1:
    from fellrec_jax.federated import sharding
    mesh = sharding.make_mesh(clients=devices)
    put = lambda tree: sharding.put_clients(tree, mesh)
    base, batches = sharding.replicate(base, mesh), put(batches)
    ctx = training.RoundContext(ctx.warmup_steps, put(ctx.lr_scale))
  rss_before = current_rss_mb()
  losses, last = [], {}
  placed = put(training.init_client_states(jax.tree.map(jnp.array, stacked), lc, jax.random.PRNGKey(0)))
  sizes = planned_sizes(batches, lc, lanes, placed, spec.get("stream_sizes", 1))  # placement: streamed or not
  del placed

  def one_round():
    states = put(training.init_client_states(jax.tree.map(jnp.array, stacked), lc, jax.random.PRNGKey(0)))
    jax.block_until_ready(states)
    start, cpu = time.perf_counter(), cpu_seconds()
    states, metrics = training.local_round(base, states, batches, *prefix, None, ctx, lc=lc, lanes=lanes,
                                           sizes=sizes)
    jax.block_until_ready((states, metrics))
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    losses[:] = np.asarray(metrics.train_loss).tolist()
    last["states"] = states  # their placement says how local_round ran (executed_flops)
    return seconds, cpu

  def summary():
    out = {"train_loss": losses, "rows_per_step": plan.rows_per_step, "row_len": plan.row_len,
           "steps": plan.steps, "lanes": lanes, "slots_per_step": plan.rows_per_step * plan.row_len,
           "rss_before_mb": rss_before, "peak_rss_mb": rss_mb(), "devices": devices,
           **executed_flops(plan, batches, lc, lanes, last["states"], sizes)}
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats:
      out["device_peak_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
    return out

  return one_round, summary


def round_steps(batches, lc, lanes: int, states):
  """(the steps as local_round runs them: waves [W, V] by lanes, else [C, S]; whether streamed; the client
  mesh's devices) for client states placed as `states`."""
  from fellrec_jax.federated import training
  streamed = training.streams(lc, states, bool(lanes))
  mesh = training.client_mesh(states) if streamed else None
  if lanes:
    batches = training.arrange(batches, training.lane_schedule(np.asarray(batches.step_mask).sum(axis=1), lanes))
  return batches, streamed, mesh.shape["clients"] if mesh is not None else 1


def planned_sizes(batches, lc, lanes: int, states, count: int):
  """The sizes our streamed steps run at, planned over this round's steps as a run plans them over its
  rounds (rounds.plan_round_shapes); None when the round is not streamed."""
  from fellrec_jax.federated import training
  from fellrec_jax.federated import stream
  steps, streamed, devices = round_steps(batches, lc, lanes, states)
  if not streamed:
    return None
  return stream.plan_sizes(training.stream_needs(steps, lc, waves=bool(lanes), shards=devices), count)


def executed_flops(plan, batches, lc, lanes: int, states, sizes) -> dict:
  """The FLOPs our round executes, in the layout local_round chose for client states placed as `states`:
  streamed (on one device, or on each device of a client mesh; each step at its size of `sizes`), or
  packed rows per client."""
  from fellrec_jax.federated import training
  from fellrec_jax.federated import stream
  from fellrec_jax.analysis import flops as flops_lib
  cfg, lcfg = lc.split.model, lc.split.lora
  batches, streamed, devices = round_steps(batches, lc, lanes, states)
  steps, width = batches.step_mask.shape if lanes else batches.step_mask.shape[::-1]
  if not streamed:
    per_step = width * flops_lib.packed_training_flops(cfg, lcfg, plan.rows_per_step, plan.row_len, plan.prefix_len)
    return {"streamed": False, "executed_flops": steps * per_step}
  # As local_round computes them: each of the devices streams width / devices members, each step at its size.
  groups = stream.group_bounds(width // devices, lc.stream_groups)
  size, sizes = training.step_sizes(training.stream_needs(batches, lc, waves=bool(lanes), shards=devices), sizes)
  size = np.asarray(size)
  flops = [devices * sum(flops_lib.streamed_training_flops(cfg, lcfg, b.tokens, b.rows, plan.row_len,
                                                           plan.prefix_len, hi - lo, stream.CAUSAL_BLOCKS)
                         for (lo, hi), b in zip(groups, budgets)) for budgets in sizes]
  tokens = [sum(b.tokens for b in budgets) for budgets in sizes]
  rows = [sum(b.rows for b in budgets) for budgets in sizes]
  return {"streamed": True, "stream_sizes": len(sizes), "budget_tokens": float(np.mean(np.take(tokens, size))),
          "budget_rows": float(np.mean(np.take(rows, size))), "executed_flops": float(np.sum(np.take(flops, size)))}


def _label_mask(n: int) -> np.ndarray:
  """train_on_inputs=True: every token but the first is a label."""
  return (np.arange(n) >= 1).astype(np.float32)


def torch_side(spec: dict):
  """(one_round, summary) of the PyTorch baseline: clients one after another over one PEFT model."""
  import torch
  import transformers
  import peft
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(spec["seed"])
  dev = "cuda" if spec["gpu"] and torch.cuda.is_available() else "cpu"
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
  workdir = Path(spec["workdir"])
  examples, _, _, init = load_examples(workdir)
  if spec["shared_weights"]:
    model = transformers.LlamaForCausalLM.from_pretrained(spec["hf_dir"], dtype=dtype)
  else:
    config = transformers.LlamaConfig.from_pretrained(spec["hf_dir"])
    model = transformers.LlamaForCausalLM(config).to(dtype)
  model.to(dev)
  lora_config = peft.LoraConfig(r=spec["lora"]["rank"], lora_alpha=spec["lora"]["alpha"],
                                lora_dropout=spec["lora_dropout"],
                                target_modules=spec["lora"]["targets"], bias="none", task_type="CAUSAL_LM")
  model = peft.get_peft_model(model, lora_config)
  model.train()
  lora_params = _peft_lora_params(model)
  trainable = [p for p in model.parameters() if p.requires_grad]
  initial = {key: torch.tensor(_peft_value(init, key)).to(dev) for key in lora_params}
  batches = [[_collate(examples, idx, spec["pad_id"], dev) for idx in steps] for steps in spec["steps"]]
  rss_before = current_rss_mb()
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  losses = []

  def one_round():
    states = [{k: v.clone() for k, v in initial.items()} for _ in batches]
    sync()
    start, cpu = time.perf_counter(), cpu_seconds()
    client_losses = []
    for c, client_batches in enumerate(batches):
      with torch.no_grad():  # swap in this client's LoRA weights
        for key, param in lora_params.items():
          param.copy_(states[c][key])
      opt = torch.optim.AdamW(trainable, lr=spec["learning_rate"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
      sched = transformers.get_linear_schedule_with_warmup(opt, spec["warmup_steps"], len(client_batches))
      total = torch.zeros((), device=dev)
      for batch in client_batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        total += loss.detach().float()
      client_losses.append(total / len(client_batches))
      with torch.no_grad():
        states[c] = {key: param.detach().clone() for key, param in lora_params.items()}
    sync()
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    losses[:] = [float(x) for x in client_losses]
    return seconds, cpu

  def summary():
    out = {"train_loss": losses, "padded_tokens": sum(int(b["input_ids"].numel()) for cb in batches for b in cb),
           "rss_before_mb": rss_before, "peak_rss_mb": rss_mb(), "threads": torch.get_num_threads(),
           "attn_implementation": model.config._attn_implementation}
    if dev == "cuda":
      out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out

  return one_round, summary


def _peft_lora_params(model) -> dict:
  """{(layer, projection, 'lora_a'|'lora_b'): parameter} of a PEFT LlamaForCausalLM."""
  params = {}
  for name, param in model.named_parameters():
    if "lora_" not in name:
      continue
    parts = name.split(".")
    layer = int(parts[parts.index("layers") + 1])
    projection = next(p for p in parts if p.endswith("_proj"))
    params[(layer, projection, "lora_a" if "lora_A" in name else "lora_b")] = param
  return params


def _peft_value(init: dict, key) -> np.ndarray:
  """Our [in, r] / [r, out] adapter of one layer as PEFT's [r, in] / [out, r] weight."""
  from fellrec_jax.model import lora as lora_lib
  layer, projection, which = key
  return np.ascontiguousarray(lora_lib.projection_adapters(init)[projection][which][layer].T)


def _collate(examples, indices, pad_id: int, dev: str) -> dict:
  """DataCollatorForSeq2Seq(pad_to_multiple_of=8): right padding, labels -100 on padding."""
  import torch
  length = -(-max(len(examples[i]) for i in indices) // 8) * 8
  ids = np.full((len(indices), length), pad_id, np.int64)
  mask = np.zeros((len(indices), length), np.int64)
  for row, i in enumerate(indices):
    ids[row, :len(examples[i])] = examples[i]
    mask[row, :len(examples[i])] = 1
  labels = np.where(mask > 0, ids, -100)
  return {k: torch.from_numpy(v).to(dev) for k, v in
          (("input_ids", ids), ("attention_mask", mask), ("labels", labels))}


SIDES = {"jax": jax_side, "torch": torch_side}


def serve(kind: str, spec: dict) -> None:
  """A side as a worker process: set up, run the warm-up round, then one round per 'round' line on stdin
  (replying 'ROUND {json}'), until 'done' (replying 'DONE {summary}'). Protocol lines go to stdout."""
  one_round, summary = SIDES[kind](spec)
  seconds, _ = one_round()
  print("READY " + json.dumps({"warmup_seconds": seconds}), flush=True)
  for line in sys.stdin:
    if line.strip() == "round":
      seconds, cpu = one_round()
      print("ROUND " + json.dumps({"seconds": seconds, "cpu_seconds": cpu}), flush=True)
    elif line.strip() == "done":
      print("DONE " + json.dumps(summary()), flush=True)
      return


class Worker:
  """A side's worker process (tools/benchmark.py --worker KIND): its rounds are run on request."""

  def __init__(self, kind: str, spec: dict, workdir: Path, env: dict):
    self.kind = kind
    spec_path = workdir / f"spec_{kind}_{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    self.proc = subprocess.Popen([sys.executable, __file__, "--worker", kind, "--spec", str(spec_path)],
                                 env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.result = {"seconds": [], "cpu_seconds": [], "rewarm_seconds": []}
    self.result.update(self._reply("READY"))
    self.pause()

  def pause(self) -> None:
    """SIGSTOP between rounds: an idle side's threads (OpenMP spinning, XLA's pools) take no CPU from the
    other side's round."""
    self.proc.send_signal(signal.SIGSTOP)

  def resume(self) -> None:
    self.proc.send_signal(signal.SIGCONT)

  def _reply(self, tag: str) -> dict:
    for line in self.proc.stdout:
      if line.startswith(tag + " "):
        return json.loads(line[len(tag) + 1:])
      sys.stdout.write(line)  # anything else the side printed
    raise RuntimeError(f"the {self.kind} worker exited (code {self.proc.wait()}) before answering {tag}")

  def round(self, timed: bool = True) -> None:
    self.resume()
    self.proc.stdin.write("round\n")
    self.proc.stdin.flush()
    reply = self._reply("ROUND")
    self.pause()
    if not timed:
      self.result["rewarm_seconds"].append(reply["seconds"])
      return
    self.result["seconds"].append(reply["seconds"])
    self.result["cpu_seconds"].append(reply["cpu_seconds"])

  def finish(self) -> dict:
    self.resume()
    self.proc.stdin.write("done\n")
    self.proc.stdin.flush()
    self.result.update(self._reply("DONE"))
    self.proc.wait()
    return self.result


def worker_env(args, kind: str) -> dict:
  env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
  flags = ("" if args.gpu else "--xla_cpu_prefer_vector_width=512") if args.xla_flags == "auto" else args.xla_flags
  if kind == "jax" and args.devices > 1 and not args.gpu:
    flags = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
  if kind == "jax" and flags:
    env["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), flags]).strip()
  if kind == "jax" and args.gpu:
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # report the memory the round needs, not a preallocation
  if args.hugepages == "yes":
    env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
  if kind == "torch" and args.omp_wait_policy:
    env["OMP_WAIT_POLICY"] = args.omp_wait_policy
  return env


def round_schedule(kinds: list, reps: int, block: int, rewarm: int) -> list:
  """The CPU order of rounds: [(kind, timed)]. Each side runs `reps` timed rounds in blocks of `block`,
  the sides' blocks in ABBA order (a, b, b, a, a, b, ...: a linear drift of the machine's speed weighs on
  both alike), and a side whose turn starts (the previous round was the other side's, or none) first runs
  `rewarm` untimed rounds."""
  if reps < 1 or block < 1 or rewarm < 0:
    raise ValueError(f"--reps ({reps}) and --block ({block}) must be >= 1, --rewarm ({rewarm}) >= 0")
  sizes = [min(block, reps - start) for start in range(0, reps, block)]
  schedule, previous = [], None
  for index, size in enumerate(sizes):
    for kind in (kinds if index % 2 == 0 else kinds[::-1]):
      if kind != previous:
        schedule += [(kind, False)] * rewarm
      schedule += [(kind, True)] * size
      previous = kind
  return schedule


def run_sides(args, specs: dict, workdir: Path) -> dict:
  """Each side's warm-up round and args.reps timed rounds. On a CPU both workers are up at once and take
  turns (`round_schedule`), so that both see the same load from other processes, the idle one stopped
  (SIGSTOP); on a GPU they run one after the other (one device, each side's memory measured alone)."""
  results = {}
  if args.gpu:
    for kind, spec in specs.items():
      worker = Worker(kind, spec, workdir, worker_env(args, kind))
      for _ in range(args.reps):
        worker.round()
      results[kind] = worker.finish()
    return results
  workers = {kind: Worker(kind, spec, workdir, worker_env(args, kind)) for kind, spec in specs.items()}
  for kind, timed in round_schedule(list(workers), args.reps, args.block, args.rewarm):
    workers[kind].round(timed)
  return {kind: worker.finish() for kind, worker in workers.items()}


def peak_flops(args, workdir: Path) -> dict:
  spec_path = workdir / "spec_peak.json"
  spec_path.write_text(json.dumps({"threads": args.threads}))
  proc = subprocess.run([sys.executable, __file__, "--worker", "peak", "--spec", str(spec_path)],
                        env=worker_env(argparse.Namespace(**{**vars(args), "gpu": False}), "peak"), cwd=ROOT)
  if proc.returncode:
    raise RuntimeError("the matmul peak measurement failed")
  return json.loads(spec_path.with_suffix(".out.json").read_text())


# ----------------------------------------------------------------------------------------------------
# Figures


def summarize(side: dict, samples: int, tokens: int, flops_per_sample: float, peak: float) -> dict:
  median = statistics.median(side["seconds"])
  out = dict(side)
  out.update(median_seconds=median, samples_per_s=samples / median, tokens_per_s=tokens / median,
             mfu=samples / median * flops_per_sample / peak,
             samples_per_cpu_s=samples / statistics.median(side["cpu_seconds"]))
  return out


def case_figures(args, info: dict, assignment, step_examples, examples, plan) -> dict:
  from fellrec_jax.analysis import flops as flops_lib
  from fellrec_jax.model import hf_interop
  from fellrec_jax.model import lora as lora_lib
  cfg = hf_interop.load_config(info["hf_dir"], dtype=info["dtype"])
  lcfg = lora_lib.LoraConfig(rank=info["lora"]["rank"], alpha=info["lora"]["alpha"], dropout=0.0,
                             targets=tuple(info["lora"]["targets"]))
  lengths = [len(examples[i]) for a in assignment for i in a]
  plain = sum(flops_lib.training_flops(cfg, lcfg, n) for n in lengths)
  torch_slots = [(len(s), -(-max(len(examples[i]) for i in s) // 8) * 8) for steps in step_examples for s in steps]
  torch_exec = sum(b * flops_lib.training_flops(cfg, lcfg, n) for b, n in torch_slots)
  steps = sum(len(s) for s in step_examples)
  return {"samples": len(lengths), "tokens": sum(lengths), "client_steps": steps,
          "flops_per_sample": plain / len(lengths), "torch_executed_flops_per_sample": torch_exec / len(lengths)}


def run_case(args, info, workdir, examples, clients: int, k: int, sides, peak: float, torch_result=None,
             dropout: float = 0.0):
  steps = int(dict(_pairs(args.steps)).get(clients, default_steps(clients))) if args.steps else default_steps(clients)
  assignment, step_examples, plan = client_steps(args, info["num_records"], info["prefix_len"], clients, steps,
                                                 [(e, _label_mask(len(e))) for e in examples])
  figures = case_figures(args, info, assignment, step_examples, examples, plan)
  common = {"workdir": str(workdir), "hf_dir": info["hf_dir"], "dtype": info["dtype"], "lora": info["lora"],
            "shared_weights": info["shared_weights"], "seed": args.seed, "reps": args.reps,
            "learning_rate": args.learning_rate, "warmup_steps": args.warmup_steps, "pad_id": info["pad_id"],
            "batch_size": args.batch_size, "threads": args.threads or os.cpu_count(), "gpu": args.gpu,
            "lora_dropout": dropout}
  case = {"clients": clients, "steps_per_client": steps, "k": k, "lora_dropout": dropout, **figures}
  specs = {}
  if "jax" in sides:
    devices = args.devices if clients % args.devices == 0 and clients <= args.lanes else 1
    specs["jax"] = dict(common, assignment=assignment, k=k, row_len=args.row_len, lanes=args.lanes, devices=devices,
                        loss_chunk=args.loss_chunk, stream_groups=args.stream_groups,
                        stream_sizes=args.stream_sizes)
  if "torch" in sides and torch_result is None:
    specs["torch"] = dict(common, steps=step_examples)
  results = run_sides(args, specs, workdir)
  for kind, result in results.items():
    case[kind] = summarize(result, figures["samples"], figures["tokens"], figures["flops_per_sample"], peak)
  if "jax" in results:
    case["jax_executed_flops_per_sample"] = results["jax"]["executed_flops"] / figures["samples"]
  if torch_result is not None:
    case["torch"] = torch_result
  if "jax" in case and "torch" in case:
    case["speedup"] = case["jax"]["samples_per_s"] / case["torch"]["samples_per_s"]
    case["speedup_cpu_time"] = case["jax"]["samples_per_cpu_s"] / case["torch"]["samples_per_cpu_s"]
  return case


def _pairs(text: str):
  """'1:8,8:4' -> [(1, 8), (8, 4)]."""
  return [tuple(int(x) for x in item.split(":")) for item in text.split(",") if item]


def table(results: dict) -> str:
  peak, args = results["peak"], results["args"]
  lines = [
      f"machine: {results['machine']['cpu']} ({results['machine']['cores']} cores), "
      f"{results['machine']['backend']} {results['machine']['device']}",
      f"model: {results['model']}; data: {results['data']}",
      f"matmul peak ({peak['n']}^3 {peak['dtype']}): jax {peak['jax'] / 1e9:.0f} GFLOP/s"
      + (f", torch {peak['torch'] / 1e9:.0f}" if "torch" in peak else ""),
      f"rounds: median of {args['reps']} timed per side"
      + ("" if results["machine"]["backend"] != "cpu" else
         f", sides taking turns in blocks of {args['block']} (ABBA), {args['rewarm']} untimed round(s) "
         "when a turn starts"),
      "",
      "| clients | k | LoRA dropout | steps/client | side | samples/s | tokens/s | speedup | samples/CPU-s "
      "| speedup (CPU time) | MFU | exec GFLOP/sample | peak RSS MiB | first-round loss |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for case in results["cases"]:
    for side in ("torch", "jax"):
      if side not in case:
        continue
      s = case[side]
      ours = side == "jax" and "speedup" in case
      speed = f"{case['speedup']:.2f}x" if ours else ""
      speed_cpu = f"{case['speedup_cpu_time']:.2f}x" if ours else ""
      executed = case.get(f"{side}_executed_flops_per_sample", float("nan")) / 1e9
      mem = f"{s['peak_rss_mb']:.0f}" + (f" (device {s['device_peak_mb']:.0f})" if "device_peak_mb" in s else "")
      loss = f"{np.mean(s['train_loss']):.4f}"
      label = f"{side} ({s['devices']} devices)" if s.get("devices", 1) > 1 else side
      lines.append(f"| {case['clients']} | {case['k'] if side == 'jax' else '-'} | {case['lora_dropout']:g} | "
                   f"{case['steps_per_client']} | "
                   f"{label} | {s['samples_per_s']:.1f} | {s['tokens_per_s']:.0f} | {speed} | "
                   f"{s['samples_per_cpu_s']:.1f} | {speed_cpu} | {100 * s['mfu']:.1f}% | {executed:.2f} | {mem} | "
                   f"{loss} |")
  lines.append("")
  if "jax_dropout_vs_none" in results:
    lines.append(f"our round with LoRA dropout {args['lora_dropout']:g} runs at "
                 f"{results['jax_dropout_vs_none']:.3f}x the samples/s of ours without")
  lines.append(f"model FLOPs per sample (plain computation): "
               f"{results['cases'][0]['flops_per_sample'] / 1e9:.2f} GFLOP; samples = training examples, "
               "tokens = their real tokens (prefix included)")
  return "\n".join(lines)


def machine_info() -> dict:
  cpu = platform.processor() or "unknown"
  try:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
      if line.startswith("Model name:"):
        cpu = line.split(":", 1)[1].strip()
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count()}


def main(argv=None):
  args = parse_args(argv)
  if args.worker == "peak":
    result = worker_peak(json.loads(Path(args.spec).read_text()))
    Path(args.spec).with_suffix(".out.json").write_text(json.dumps(result))
    return
  if args.worker:
    serve(args.worker, json.loads(Path(args.spec).read_text()))
    return
  with tempfile.TemporaryDirectory() as tmp:
    workdir = Path(args.workdir or tmp)
    workdir.mkdir(parents=True, exist_ok=True)
    run(args, workdir)


def run(args, workdir: Path):
  args.threads = args.threads or os.cpu_count()
  sides = [s for s in args.sides.split(",") if s]
  round_schedule(sides, args.reps, args.block, args.rewarm)  # a bad --reps/--block/--rewarm fails here
  start = time.perf_counter()
  info = prepare(args, workdir)
  args.gpu = False
  peak = peak_flops(args, workdir)
  args.gpu = peak["backend"] != "cpu"
  examples, _, _, _ = load_examples(workdir)
  L = info["config"]["num_layers"]
  main_clients = args.quick_clients
  clients = [main_clients] if args.quick else [int(c) for c in args.clients.split(",") if c]
  ks = [] if args.quick or not args.ks else list(range(1, L)) if args.ks == "all" else [int(k) for k in args.ks.split(",")]
  # --quick: without dropout first, then the reference's (the default --lora_dropout).
  dropouts = sorted({0.0, args.lora_dropout}) if args.quick else [args.lora_dropout]
  cases, torch_at = [], {}
  for c in clients:
    for dropout in dropouts:
      print(f"case: {c} clients, k={info['split_k']}, LoRA dropout {dropout}", flush=True)
      case = run_case(args, info, workdir, examples, c, info["split_k"], sides, peak["jax"], dropout=dropout)
      cases.append(case)
    torch_at[c] = case.get("torch")
  for k in ks:
    if k == info["split_k"] and main_clients in clients:
      continue
    print(f"case: {main_clients} clients, k={k}", flush=True)
    cases.append(run_case(args, info, workdir, examples, main_clients, k, [s for s in sides if s == "jax"] +
                          (["torch"] if torch_at.get(main_clients) else []), peak["jax"], torch_at.get(main_clients),
                          dropout=args.lora_dropout))
  cfg = info["config"]
  results = {
      "machine": {**machine_info(), "backend": peak["backend"], "device": peak["device"]},
      "peak": peak, "data": f"{info['source']} ({info['num_records']} train records, prefix P={info['prefix_len']}, "
                            f"tokenizer {info['tokenizer_size']} tokens)",
      "model": (f"Llama d={cfg['hidden_size']} L={cfg['num_layers']} heads={cfg['num_heads']}/"
                f"{cfg['num_kv_heads']} ffn={cfg['intermediate_size']} V={cfg['vocab_size']} "
                f"({info['parameters'] / 1e6:.1f}M parameters), {info['dtype']}, LoRA r={info['lora']['rank']} "
                f"on {','.join(t.replace('_proj', '') for t in info['lora']['targets'])}, B={args.batch_size}"
                + (", the torch side's batches grouped by length" if args.group_by_length else "")),
      "info": info, "args": {k: v for k, v in vars(args).items() if k not in ("worker", "spec")},
      "cases": cases, "wall_seconds": time.perf_counter() - start,
  }
  main_case = next((c for c in cases if c["clients"] == main_clients and c["lora_dropout"] == args.lora_dropout),
                   cases[0])
  no_dropout = next((c for c in cases if c["clients"] == main_clients and c["lora_dropout"] == 0.0
                     and c["k"] == main_case["k"]), None)
  for side in ("jax", "torch"):
    if side in main_case:
      results[side] = {"samples_per_s": main_case[side]["samples_per_s"],
                       "tokens_per_s": main_case[side]["tokens_per_s"], "mfu": main_case[side]["mfu"],
                       "peak_rss_mb": main_case[side]["peak_rss_mb"]}
  if "speedup" in main_case:
    results["speedup"] = main_case["speedup"]
    results["speedup_cpu_time"] = main_case["speedup_cpu_time"]
  if no_dropout is not None and no_dropout is not main_case and "jax" in main_case:
    # Our round with dropout against ours without it (1.0: dropout costs nothing).
    results["jax_dropout_vs_none"] = main_case["jax"]["samples_per_s"] / no_dropout["jax"]["samples_per_s"]
  text = table(results)
  print(text)
  if args.table:
    Path(args.table).write_text(text + "\n")
  if args.out:
    Path(args.out).write_text(json.dumps(results, indent=2, default=float))
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
