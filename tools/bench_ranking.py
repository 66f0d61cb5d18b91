"""Time the three ranking modes (grounding, likelihood, constrained) on a random tiny model.

  python tools/bench_ranking.py [--items 1000] [--prompts 64] [--games ../shared/data/games_bigrec]

Synthetic by default: `--items` made-up titles and `--prompts` prompts of docs/method.md §1's template with 10
history titles each. With --games, the catalog is every title in the directory's records and the prompts
are the first `--prompts` test records. A byte-level BPE is trained on the catalog and the template; the
model is random (init_params), so generation runs to --max_new_tokens (the worst case). Each mode is
timed twice: cold (with compilation) and warm. Prints one line per mode.
"""

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from fellrec_jax.model import lora
from fellrec_jax.evaluation import recommend
from fellrec_jax.model import llama as model_lib

HEADER = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n")
INSTRUCTION = ("Given a list of video games the user has played before, please recommend a new video game that "
               "the user likes to the user.")
PHRASE = "The user has played the following video games before:"


def prompt_text(history):
  listed = ", ".join(f'"{t}"' for t in history)
  return f"{HEADER}### Instruction:\n{INSTRUCTION}\n\n### Input:\n{PHRASE}{listed}\n \n\n### Response:\n"


def synthetic(num_items, num_prompts, rs):
  words = ["Dark", "Star", "Legend", "Racer", "Quest", "Soul", "Iron", "Sky", "Dragon", "Ninja", "Zero", "Prime"]
  platforms = ["PC", "PlayStation 4", "Xbox One", "Nintendo Switch", "Wii U"]
  titles = sorted({f"{' '.join(rs.choice(words, 3))} {i} - {rs.choice(platforms)}" for i in range(num_items)})
  prompts = [prompt_text(rs.choice(titles, 10, replace=False)) for _ in range(num_prompts)]
  histories = [rs.choice(len(titles), 10, replace=False).tolist() for _ in range(num_prompts)]
  return titles, prompts, histories


def games(directory, num_prompts):
  records = [r for split in ("train", "valid", "test") for r in json.loads((Path(directory) / f"{split}.json").read_text())]
  parse = lambda text: text.strip()[1:-1].split('", "')
  titles = sorted({t for r in records for t in parse(r["output"]) + parse(r["input"].split(PHRASE, 1)[1])})
  index = {t: i for i, t in enumerate(titles)}
  test = json.loads((Path(directory) / "test.json").read_text())[:num_prompts]
  prompts = [f"{HEADER}### Instruction:\n{r['instruction']}\n\n### Input:\n{r['input']}\n\n### Response:\n" for r in test]
  histories = [[index[t] for t in parse(r["input"].split(PHRASE, 1)[1])] for r in test]
  return titles, prompts, histories


def train_tokenizer(texts, vocab_size):
  bpe = Tokenizer(models.BPE(unk_token="<unk>"))
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--items", type=int, default=1000)
  parser.add_argument("--prompts", type=int, default=64)
  parser.add_argument("--games", help="a BIGRec data directory (catalog and test prompts from it)")
  parser.add_argument("--modes", default=",".join(recommend.MODES))
  parser.add_argument("--max_new_tokens", type=int, default=128)
  parser.add_argument("--hidden", type=int, default=64)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--vocab", type=int, default=1000)
  parser.add_argument("--generation_batch", type=int, default=16)
  parser.add_argument("--title_tokens", type=int, default=recommend.RankingConfig.likelihood_title_tokens)
  parser.add_argument("--warm", action="store_true", help="also time a second (compiled) run")
  args = parser.parse_args()

  rs = np.random.RandomState(0)
  titles, texts, histories = games(args.games, args.prompts) if args.games else synthetic(args.items, args.prompts, rs)
  tokenizer = train_tokenizer(texts + [f'"{t}"' for t in titles], args.vocab)
  cfg = model_lib.LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                              num_layers=args.layers, num_heads=4, num_kv_heads=2, head_dim=args.hidden // 4,
                              max_position_embeddings=4096)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  lcfg = lora.LoraConfig()
  adapters = lora.init_adapters(cfg, lcfg, jax.random.PRNGKey(1))
  prompts = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
  print(f"{len(titles)} items, {len(prompts)} prompts of {np.mean([len(p) for p in prompts]):.0f} tokens, "
        f"model d={cfg.hidden_size} L={cfg.num_layers} V={cfg.vocab_size}, {jax.devices()[0].platform}")
  for mode in args.modes.split(","):
    rcfg = recommend.RankingConfig(mode=mode, max_new_tokens=args.max_new_tokens,
                                   generation_batch=args.generation_batch, likelihood_title_tokens=args.title_tokens)
    start = time.perf_counter()
    catalog = recommend.prepare_catalog(params, cfg, tokenizer, titles, texts[:2], rcfg)
    prepared = time.perf_counter() - start
    times = []
    for _ in range(2 if args.warm else 1):
      start = time.perf_counter()
      ranking = recommend.rank_client(params, adapters, cfg, lcfg, tokenizer, catalog, prompts, histories, rcfg)
      times.append(time.perf_counter() - start)
    generated = np.mean([len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in ranking.predictions])
    print(f"{mode:12s} catalog {prepared:6.1f} s   rank cold {times[0]:6.1f} s"
          + (f"   warm {times[1]:6.1f} s" if args.warm else "")
          + f"   ({len(prompts) / times[-1]:.1f} prompts/s; predictions of {generated:.1f} tokens on average)")


if __name__ == "__main__":
  main()
