"""Time the ranking modes (grounding, likelihood, constrained) on a random tiny model, against PyTorch.

  python tools/bench_ranking.py --quick --torch                   # grounding and likelihood against PyTorch
  python tools/bench_ranking.py [--items 1000] [--prompts 64] [--games DIR] [--modes ...] [--torch]

Synthetic by default: `--items` made-up titles and `--prompts` prompts of docs/method.md §1's template with 10
history titles each. With --games, the catalog is every title in the directory's records and the prompts
are the first `--prompts` test records. A byte-level BPE is trained on the catalog and the template; the
model is random (init_params), so generation runs to --max_new_tokens (the worst case, the same number of
steps on both sides). Each mode is timed cold (with compilation) and, with --warm or --torch, warm.

--torch adds the PyTorch side on the same model (saved as a Hugging Face checkpoint, LoRA through PEFT),
the same prompt tokens and catalog, all cores, in its own process (as tools/benchmark.py's sides: neither
runtime's threads share a process with the other's):
  grounding   the reference's procedure (BIGRec): transformers `generate(num_beams=4, do_sample=False)`
              on left-padded batches of --generation_batch prompts, the text after "Response:" unquoted,
              embedded by the base model (`hidden_states[-1][:, -1]`, adapters off), L2 distance to the
              catalog's embeddings (`torch.cdist`), history excluded, top 20.
  likelihood  each prompt encoded once (`use_cache`), its cache repeated for blocks of titles, every
              title's summed log-probability, history excluded, top 20.
The catalog's embeddings are computed once per side and not counted in prompts/s. Our side runs first
(cold, then warm), then the PyTorch process builds the same tokenizer, model and prompts from the same
seeds; each side is timed --reps times, the fastest kept; the ratio is our warm prompts/s over torch's.
The predictions of both sides are compared (grounding: generated titles; likelihood: top items).
"""

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fellrec_jax.model import lora  # noqa: E402
from fellrec_jax.evaluation import recommend  # noqa: E402
from fellrec_jax.model import llama as model_lib  # noqa: E402

HEADER = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n")
INSTRUCTION = ("Given a list of video games the user has played before, please recommend a new video game that "
               "the user likes to the user.")
PHRASE = "The user has played the following video games before:"
TORCH_MODES = ("grounding", "likelihood")  # the modes with a PyTorch side


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
  parser.add_argument("--reps", type=int, default=3, help="timed runs per side (warm and torch); the fastest is kept")
  parser.add_argument("--torch", action="store_true", help="also run the PyTorch side and report the ratio")
  parser.add_argument("--torch_side", metavar="FILE",
                      help="run only the PyTorch side and write its results to FILE (what --torch starts)")
  parser.add_argument("--quick", action="store_true",
                      help="the quick size: 1,000 items, 32 prompts, grounding and likelihood")
  args = parser.parse_args()
  if args.quick:
    args.items, args.prompts, args.modes = 1000, 32, "grounding,likelihood"
  if args.torch and set(args.modes.split(",")) - set(TORCH_MODES):
    parser.error(f"--torch compares the modes {', '.join(TORCH_MODES)} only (--modes {args.modes})")

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
  fastest = lambda fn, label: min((timed(fn, f"{label} {rep + 1}/{args.reps}") for rep in range(args.reps)),
                                  key=lambda result: result[1])
  configs = {mode: recommend.RankingConfig(mode=mode, max_new_tokens=args.max_new_tokens,
                                           generation_batch=args.generation_batch,
                                           likelihood_title_tokens=args.title_tokens)
             for mode in args.modes.split(",")}
  if args.torch_side:
    torch_model = make_torch_side(cfg, params, lcfg, adapters)
    sides = {}
    for mode, rcfg in configs.items():
      responses = recommend.response_tokens(tokenizer, texts[:2], titles)  # what likelihood ranks
      (result, seconds, prepared), _ = fastest(
          lambda: torch_rank(torch_model, tokenizer, mode, prompts, titles, responses, histories, rcfg),
          f"{mode} torch (catalog included)")
      sides[mode] = {"result": np.asarray(result).tolist(), "seconds": seconds, "prepared": prepared}
    Path(args.torch_side).write_text(json.dumps(sides))
    return
  ours = {}
  for mode, rcfg in configs.items():
    start = time.perf_counter()
    catalog = recommend.prepare_catalog(params, cfg, tokenizer, titles, texts[:2], rcfg)
    prepared = time.perf_counter() - start
    rank = lambda: recommend.rank_client(params, adapters, cfg, lcfg, tokenizer, catalog, prompts, histories, rcfg)
    ranking, cold = timed(rank, f"{mode} ours, cold")
    line = f"{mode:12s} catalog {prepared:6.1f} s   rank cold {cold:6.1f} s"
    if args.warm or args.torch:
      ranking, warm = fastest(rank, f"{mode} ours, warm")
      line += f"   warm {warm:6.1f} s"
    seconds = warm if args.warm or args.torch else cold
    generated = np.mean([len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in ranking.predictions])
    ours[mode] = (line + f"   ({len(prompts) / seconds:.2f} prompts/s; predictions of {generated:.1f} tokens on "
                  "average)", ranking, seconds)
    print(ours[mode][0], flush=True)
  if not args.torch:
    return
  theirs = run_torch_side(sys.argv[1:])
  print("\nsummary (ours warm, in this process; PyTorch in its own):")
  for mode, (line, ranking, seconds) in ours.items():
    torch_result, torch_seconds = theirs[mode]["result"], theirs[mode]["seconds"]
    same = (np.mean([a == b for a, b in zip(ranking.predictions, torch_result)]) if mode == "grounding" else
            np.mean(ranking.items[:, 0] == np.asarray(torch_result)[:, 0]))
    print(line)
    print(f"{'':12s} torch: catalog {theirs[mode]['prepared']:6.1f} s   rank {torch_seconds:6.1f} s   "
          f"({len(prompts) / torch_seconds:.2f} prompts/s)   speedup {torch_seconds / seconds:.2f}x   "
          f"same {'prediction' if mode == 'grounding' else 'top item'}: {same:.0%}")


def run_torch_side(argv) -> dict:
  """The PyTorch side's results per mode, from this script run again with --torch_side (its own process)."""
  with tempfile.TemporaryDirectory(prefix="bench_ranking_") as directory:
    out = Path(directory) / "torch.json"
    subprocess.run([sys.executable, __file__, *[a for a in argv if a != "--torch"], f"--torch_side={out}"],
                   check=True)
    return json.loads(out.read_text())


def timed(fn, label: str):
  """(fn(), wall seconds); prints the wall and CPU seconds (all threads), which on a loaded machine differ."""
  start, cpu = time.perf_counter(), time.process_time()
  out = fn()
  seconds = time.perf_counter() - start
  print(f"  {label}: {seconds:.1f} s, {time.process_time() - cpu:.1f} CPU-s", flush=True)
  return out, seconds


# ----------------------------------------------------------------------------------------------------
# The PyTorch side


def make_torch_side(cfg, params, lcfg, adapters):
  """transformers' LlamaForCausalLM of the same weights with the same LoRA through PEFT (eval mode)."""
  import peft
  import torch
  from transformers import LlamaForCausalLM

  from fellrec_jax.model import hf_interop

  with tempfile.TemporaryDirectory(prefix="bench_ranking_") as directory:  # the weights are read into memory
    directory = Path(directory)
    hf_interop.save_llama(directory / "base", cfg, params)
    hf_interop.save_peft_adapter(directory / "lora", adapters, lcfg)
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(str(directory / "base"), torch_dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, str(directory / "lora")).eval()


def _left_padded(token_lists, pad_id):
  import torch
  length = max(len(t) for t in token_lists)
  ids = torch.full((len(token_lists), length), pad_id, dtype=torch.long)
  mask = torch.zeros((len(token_lists), length), dtype=torch.long)
  for row, tokens in enumerate(token_lists):
    ids[row, length - len(tokens):] = torch.tensor(tokens)
    mask[row, length - len(tokens):] = 1
  return ids, mask


def torch_embed(model, token_lists, pad_id, batch_size):
  """BIGRec's embedding: hidden_states[-1][:, -1] of left-padded batches, with the base model."""
  import torch
  out = []
  with torch.no_grad(), model.disable_adapter():
    for start in range(0, len(token_lists), batch_size):
      ids, mask = _left_padded(token_lists[start:start + batch_size], pad_id)
      position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # real-token positions, as our default embedding
      hidden = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, output_hidden_states=True)
      out.append(hidden.hidden_states[-1][:, -1, :])
  return torch.cat(out)


def torch_rank(model, tokenizer, mode, prompts, titles, responses, histories, rcfg):
  """(predictions or top items, ranking seconds, catalog seconds) of the PyTorch side."""
  start = time.perf_counter()
  k = max(rcfg.ks)
  if mode == "grounding":
    items = torch_embed(model, recommend.embedding_tokens(tokenizer, titles), tokenizer.pad_token_id, rcfg.embed_batch)
    prepared = time.perf_counter() - start
    start = time.perf_counter()
    predictions = torch_grounding(model, tokenizer, prompts, items, histories, rcfg, k)[0]
  elif mode == "likelihood":
    prepared = 0.0
    predictions = torch_likelihood(model, prompts, responses, histories, k, tokenizer.pad_token_id)
  else:
    raise ValueError(f"no PyTorch side for mode {mode!r}")
  return predictions, time.perf_counter() - start, prepared


def torch_grounding(model, tokenizer, prompts, item_embeddings, histories, rcfg, k):
  import torch
  predictions = []
  with torch.no_grad():
    for start in range(0, len(prompts), rcfg.generation_batch):
      ids, mask = _left_padded(prompts[start:start + rcfg.generation_batch], tokenizer.pad_token_id)
      out = model.generate(input_ids=ids, attention_mask=mask, num_beams=rcfg.num_beams, do_sample=False,
                           max_new_tokens=rcfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
      texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
      predictions += [recommend.response_text(t) for t in texts]
    pred = torch_embed(model, recommend.embedding_tokens(tokenizer, predictions), tokenizer.pad_token_id,
                       rcfg.embed_batch)
    distance = torch.cdist(pred, item_embeddings, p=2)
    for row, history in enumerate(histories):
      distance[row, list(history)] = float("inf")
    ranked = torch.topk(-distance, k, dim=1).indices.numpy()
  return predictions, ranked


def torch_likelihood(model, prompts, responses, histories, k, pad_id, title_batch=64):
  """Top-k items by summed log-probability: titles sorted by length, in blocks that each read a copy of
  the prompt's cache."""
  import torch
  lengths = np.array([len(r) for r in responses])
  order = np.argsort(lengths, kind="stable")
  blocks = []
  for start in range(0, len(order), title_batch):
    items = order[start:start + title_batch]
    block = torch.full((len(items), int(lengths[items].max())), pad_id, dtype=torch.long)
    for row, item in enumerate(items):
      block[row, :lengths[item]] = torch.tensor(responses[item])
    valid = torch.arange(block.shape[1])[None] < torch.tensor(lengths[items])[:, None]
    blocks.append((torch.tensor(items), block, valid))
  ranked = []
  with torch.no_grad():
    for prompt, history in zip(prompts, histories):
      out = model(input_ids=torch.tensor([prompt]), use_cache=True)
      first = torch.log_softmax(out.logits[0, -1], -1)
      scores = torch.empty(len(responses))
      for items, block, valid in blocks:
        cache = copy.deepcopy(out.past_key_values)
        cache.batch_repeat_interleave(block.shape[0])
        logits = model(input_ids=block, past_key_values=cache, use_cache=True).logits
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, block[:, 1:, None])[..., 0]
        scores[items] = first[block[:, 0]] + torch.where(valid[:, 1:], logp, 0.0).sum(-1)
      scores[list(history)] = -float("inf")
      ranked.append(torch.topk(scores, k).indices.numpy())
  return np.stack(ranked)


if __name__ == "__main__":
  main()
