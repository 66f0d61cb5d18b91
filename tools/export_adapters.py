"""Writes a run's LoRA adapters from its Orbax checkpoint as PEFT directories, for any number of clients.

  python tools/export_adapters.py --workdir runs/default --out adapters_out            # every client, best
  python tools/export_adapters.py --workdir runs/default --clients 0,3,5-9 --which last --out adapters_out

Writes OUT/client_<c>/{adapter_config.json, adapter_model.safetensors}; adapter_config.json's
base_model_name_or_path is the run's base model (model.hf_dir, or the tiny base it pretrained) as an absolute
path, or --base_model (e.g. a Hugging Face Hub id of the same checkpoint). Load one with
peft.AutoPeftModelForCausalLM.from_pretrained(OUT/client_0); start a run from them with
--config.model.init_adapters=OUT.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fellrec_jax.model.hf_interop import CheckpointError  # noqa: E402
from fellrec_jax.run import adapters  # noqa: E402
from fellrec_jax.run.checkpoint import ResumeError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--workdir", required=True, help="workdir of a train.py run (its checkpoints/, config.json)")
  parser.add_argument("--out", required=True, help="output directory (one client_<c>/ per client)")
  parser.add_argument("--clients", default="all", help='"all" (default), or ids and ranges: 0,3,5-9')
  parser.add_argument("--which", choices=adapters.WHICH, default="best",
                      help="each client's best adapters (by validation loss) or the last round's")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (rounds done; default the latest)")
  parser.add_argument("--base_model", default=None, help="base_model_name_or_path to write (default: the run's base)")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  args = parse_args(argv)
  try:
    written = adapters.export_adapters(args.workdir, args.out, args.clients, args.which, args.step, args.base_model)
  except (FileNotFoundError, ValueError, CheckpointError, ResumeError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(f"wrote {len(written)} PEFT adapter directories to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
