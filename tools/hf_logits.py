"""Logits of a local Hugging Face Llama checkpoint (and optional PEFT adapter) computed by fellrec_jax.

  python tools/hf_logits.py --hf_dir DIR [--peft_dir DIR] --input_ids IDS.npy \
      [--attention_mask MASK.npy] [--dtype float32] --out LOGITS.npy

Writes float32 logits [B, T, V]. Positions are 0..T-1 as in `LlamaForCausalLM(input_ids, attention_mask)`
(pass --positions_from_mask for cumsum(mask) - 1, as `generate` does with left padding).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fellrec_jax.model import hf_interop
from fellrec_jax.model import lora
from fellrec_jax.model import llama as model


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--hf_dir", required=True, help="local Hugging Face Llama directory")
  parser.add_argument("--peft_dir", help="local PEFT LoRA adapter directory (optional)")
  parser.add_argument("--input_ids", required=True, help=".npy of int token ids [B, T]")
  parser.add_argument("--attention_mask", help=".npy of 0/1 [B, T] (default: all ones)")
  parser.add_argument("--positions_from_mask", action="store_true", help="positions = cumsum(mask) - 1")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
  parser.add_argument("--out", required=True, help="output .npy for float32 logits [B, T, V]")
  return parser.parse_args(argv)


def load_int_array(path: str, name: str) -> np.ndarray:
  array = np.load(path)
  if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
    sys.exit(f"{path}: --{name} must be a 2-D integer array [B, T], got shape {array.shape} dtype {array.dtype}")
  return array


def main(argv=None):
  args = parse_args(argv)
  cfg, base = hf_interop.load_llama(args.hf_dir, dtype=args.dtype)
  if args.peft_dir:
    lcfg, adapters = hf_interop.load_peft_adapter(args.peft_dir, cfg)
  else:
    lcfg = lora.LoraConfig(dropout=0.0)
    adapters = {}
  lcfg = lora.LoraConfig(lcfg.rank, lcfg.alpha, 0.0, lcfg.targets, lcfg.use_rslora)  # inference: no dropout
  ids = load_int_array(args.input_ids, "input_ids")
  if ids.min() < 0 or ids.max() >= cfg.vocab_size:
    sys.exit(f"{args.input_ids}: token ids must be in [0, {cfg.vocab_size}), got [{ids.min()}, {ids.max()}]")
  mask = np.ones_like(ids) if args.attention_mask is None else load_int_array(args.attention_mask, "attention_mask")
  if mask.shape != ids.shape:
    sys.exit(f"{args.attention_mask}: shape {mask.shape} differs from input_ids {ids.shape}")
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0) if args.positions_from_mask else None
  inputs = model.plain_inputs(ids, mask, positions)
  forward = jax.jit(model.forward, static_argnames=("cfg", "lcfg"))
  logits = forward(base, adapters, inputs, cfg=cfg, lcfg=lcfg)
  np.save(args.out, np.asarray(logits, np.float32))
  print(f"wrote {args.out}: logits {tuple(logits.shape)} float32")


if __name__ == "__main__":
  main()
