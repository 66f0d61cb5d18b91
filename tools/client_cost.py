"""What one client costs against the split point k: a table and a plot (fellrec_jax/analysis/client_cost.py).

  python tools/client_cost.py --preset cpu --out_dir /tmp/cc_cpu
  python tools/client_cost.py --preset llama7b --ks 1,8,16,20,31 --out_dir /tmp/cc_7b
  python tools/client_cost.py --hf_dir path/to/llama --dtype bfloat16 --out_dir /tmp/cc_hf

Writes client_cost.md, client_cost.json and client_cost.png to --out_dir and prints the table. Peak
memory comes from compiling (not running) the client's step on the default backend, so a 7B shape needs
no memory for weights; its numbers are that backend compiler's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import jax  # noqa: E402

from fellrec_jax.analysis import client_cost
from fellrec_jax.model import lora as lora_lib
from fellrec_jax.model import llama as model_lib

PRESETS = {
    # tools/benchmark.py's CPU case: GQA (4 query heads, 2 key/value heads), SwiGLU width 688.
    "cpu": dict(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4, num_kv_heads=2,
                head_dim=64, vocab_size=8192, dtype="float32"),
    # Llama-2-7B's shape (the reference's base model), bfloat16.
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                    head_dim=128, vocab_size=32000, dtype="bfloat16", rms_norm_eps=1e-5,
                    max_position_embeddings=4096),
    # Seconds: for tests.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                 vocab_size=256, dtype="float32"),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  p.add_argument("--hf_dir", default="", help="a local Hugging Face Llama directory (its config.json) "
                 "instead of --preset")
  p.add_argument("--dtype", default="", help="compute dtype (float32 | bfloat16); default: the preset's, "
                 "float32 with --hf_dir")
  p.add_argument("--param_dtype", default="", help="dtype of the frozen base (default: the compute dtype)")
  p.add_argument("--lora_rank", type=int, default=8)
  p.add_argument("--lora_targets", default="q_proj,v_proj")
  p.add_argument("--batch_size", type=int, default=8, help="B of the compiled client step")
  p.add_argument("--seq_len", type=int, default=256, help="T of the compiled client step")
  p.add_argument("--tokens_per_sample", type=int, default=0, help="n of FLOPs and boundary bytes per "
                 "sample (default: --seq_len)")
  p.add_argument("--ks", default="all", help="split points, comma-separated ('all': 1 .. L-1)")
  p.add_argument("--loss_chunk", type=int, default=0, help="positions per LM-head chunk (0: all at once)")
  p.add_argument("--remat", action="store_true", help="recompute layer activations in the backward pass")
  p.add_argument("--out_dir", default="", help="where to write client_cost.{md,json,png} (default: print only)")
  return p.parse_args(argv)


def model_config(args) -> model_lib.LlamaConfig:
  if args.hf_dir:
    from fellrec_jax.model import hf_interop
    return hf_interop.load_config(args.hf_dir, dtype=args.dtype or "float32")
  cfg = model_lib.LlamaConfig(**PRESETS[args.preset])
  return cfg.replace(dtype=args.dtype) if args.dtype else cfg


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  cfg = model_config(args)
  lcfg = lora_lib.LoraConfig(rank=args.lora_rank, targets=tuple(args.lora_targets.split(",")))
  ks = None if args.ks == "all" else [int(k) for k in args.ks.split(",")]
  rows = client_cost.cost_table(cfg, lcfg, args.batch_size, args.seq_len, ks,
                                tokens_per_sample=args.tokens_per_sample or None,
                                param_dtype=args.param_dtype or None, loss_chunk=args.loss_chunk,
                                remat=args.remat)
  name = args.hf_dir or args.preset
  n = rows[0]["tokens_per_sample"] if rows else args.seq_len
  caption = (f"{name}: L={cfg.num_layers}, D={cfg.hidden_size}, {cfg.dtype}; LoRA r={lcfg.rank} on "
             f"{','.join(lcfg.targets)}; FLOPs and boundary per sample of n={n} tokens (no shared prefix); "
             f"peak of one compiled client step on [{args.batch_size}, {args.seq_len}] ({jax.default_backend()})")
  table = client_cost.markdown(rows)
  print(caption + "\n\n" + table)
  if args.out_dir:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "client_cost.md").write_text(caption + "\n\n" + table)
    report = {"model": dataclasses.asdict(cfg), "lora": dataclasses.asdict(lcfg), "args": vars(args),
              "backend": jax.default_backend(), "rows": rows}
    (out / "client_cost.json").write_text(json.dumps(report, indent=1))
    client_cost.plot(rows, out / "client_cost.png", title=f"client cost vs k ({name})")
  return rows


if __name__ == "__main__":
  main()
