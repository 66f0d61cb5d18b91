"""Recommendations for each client's test users with its own adapters (docs/method.md §5), in one of three modes.

  grounding    BIGRec: beam search (4 beams, 128 new tokens), the text after "### Response:" with its
               quotes removed, embedded by the base model; items ranked by L2 distance (grounding.py).
  likelihood   every catalog title scored by its log-probability as the response (likelihood.py).
  constrained  beam search restricted to catalog titles (trie.py): the top beam is a catalog item, ranked
               first, and the rest follow by L2 distance from its embedding, as in grounding.
Every mode excludes the user's train+valid history and returns max(ks) items per user.

Tokenization matches training (prompts.py of the data layer): a training example is BOS +
tokens(prompt + '"Title"') + EOS in one tokenizer call, and a generation prompt is BOS + tokens(prompt).
So a title's response tokens are tokens(prompt + '"Title"') minus tokens(prompt), plus EOS; this needs
the prompt's tokens to be a prefix, which holds when "\\n" (the prompt's last character) ends a token, as
in Llama's SentencePiece and byte-level BPE tokenizers; `response_tokens` raises where it does not.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import numpy as np
from tqdm import tqdm

from fellrec_jax.model import generation
from fellrec_jax.evaluation import grounding
from fellrec_jax.evaluation import likelihood
from fellrec_jax.evaluation import metrics
from fellrec_jax.model import trie as trie_lib

RESPONSE_MARKER = "### Response:"
MODES = ("grounding", "likelihood", "constrained")


@dataclasses.dataclass(frozen=True)
class RankingConfig:
  """How test users are ranked; defaults follow the reference (BIGRec grounding)."""

  mode: str = "grounding"  # one of MODES
  ks: tuple[int, ...] = (5, 10, 20)  # metric cut-offs; every user gets max(ks) items
  num_beams: int = 4  # beam width of generation (reference: 4)
  max_new_tokens: int = 128  # generation cap (reference: 128); constrained search uses the longest title
  generation_batch: int = 8  # prompts per beam-search call
  embed_batch: int = 32  # texts per embedding call
  bigrec_positions: bool = False  # reproduce BIGRec's padding-dependent embedding positions (grounding.py)
  distance_block: int = 4096  # items per block of the L2 ranking (memory: queries x block)
  likelihood_prompt_batch: int = 8  # prompts scored together in likelihood mode
  # Trie nodes (distinct title prefixes, likelihood.trie_blocks) per block in likelihood mode; the block's
  # logits take prompt_batch x this x vocab x 4 bytes.
  likelihood_title_tokens: int = 512  # CPU optimum on tiny models; raise it on an accelerator

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"unknown ranking mode {self.mode!r}; choose from {MODES}")


# ----------------------------------------------------------------------------------------------------
# Text and tokens


def response_text(generated: str) -> str:
  """The predicted title in generated text.

  The part after the last "### Response:" if the model wrote one (generated text starts after the
  prompt's), outer whitespace stripped, then one pair of surrounding double quotes removed (a title's own
  quotes and leading spaces are kept: the response format is `"Title"`).
  """
  text = generated.rsplit(RESPONSE_MARKER, 1)[-1].strip()
  if text.startswith('"'):
    text = text[1:]
  if text.endswith('"'):
    text = text[:-1]
  return text


def _tokens(tokenizer, text: str) -> list[int]:
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def embedding_tokens(tokenizer, texts: Sequence[str]) -> list[list[int]]:
  """BOS + tokens(text) of each text: what a tokenizer call gives BIGRec's embedding (never empty)."""
  bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
  return [bos + _tokens(tokenizer, text) or [tokenizer.eos_token_id] for text in texts]


def response_tokens(tokenizer, prompts: str | Sequence[str], titles: Sequence[str]) -> list[list[int]]:
  """Each title's response tokens as training encodes them: tokens(prompt + '"title"') after the
  prompt's tokens, then EOS. With several prompts, checks that the result does not depend on the prompt."""
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  first = None
  for prompt in prompts:
    head = _tokens(tokenizer, prompt)
    out = []
    fulls = tokenizer([f'{prompt}"{title}"' for title in titles], add_special_tokens=False)["input_ids"]
    for title, full in zip(titles, fulls):
      full = list(full)
      if full[:len(head)] != head:
        raise ValueError(
            f"the prompt's tokens are not a prefix of the prompt + response tokens for title {title!r} (the "
            f"tokenizer merges across the prompt's end {prompt[-20:]!r}): response tokens are undefined "
            f"for this tokenizer; use grounding mode")
      out.append(full[len(head):] + [tokenizer.eos_token_id])
    if first is not None and out != first:
      raise ValueError("the titles' response tokens depend on the prompt: this tokenizer merges across "
                       "the prompt's last character")
    first = out if first is None else first
  return first


# ----------------------------------------------------------------------------------------------------
# Generation


def beam_generate(base, adapters, cfg, lcfg, prompts: Sequence[Sequence[int]], *, num_beams: int,
                  max_new_tokens: int, batch_size: int, eos_id: int, pad_id: int,
                  trie: trie_lib.Trie | None = None, prefix_length: int | None = None,
                  progress=None) -> list[np.ndarray]:
  """The top beam's generated tokens (EOS included when reached) of each prompt, in the prompts' order.

  The prompts' first `prefix_length` tokens (default: all they share, the instruction template) are
  encoded once; the rest are sorted by length and left-padded in batches of `batch_size` rows to
  `grounding.padded_length`. Neither changes the result (positions count real tokens, as transformers'
  generate does). `progress(n)` is called after each batch of n prompts.
  """
  prefix, suffixes = generation.split_prefix(base, adapters, cfg, lcfg, prompts, prefix_length)
  order = np.argsort([len(p) for p in suffixes], kind="stable")
  out: list[np.ndarray] = [np.zeros(0, np.int32)] * len(prompts)
  for start in range(0, len(prompts), batch_size):
    index = order[start:start + batch_size]
    length = grounding.padded_length(max(len(suffixes[i]) for i in index))
    ids, mask = grounding.left_pad([suffixes[i] for i in index], length, batch_size, pad_id)
    result = generation.beam_search(base, adapters, ids, mask, cfg=cfg, lcfg=lcfg, max_new_tokens=max_new_tokens,
                                    num_beams=num_beams, eos_id=eos_id, pad_id=pad_id, trie=trie, prefix=prefix)
    tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    for row, i in enumerate(index):
      out[i] = tokens[row, :lengths[row]]
    if progress is not None:
      progress(len(index))
  return out


def generate_responses(base, adapters, cfg, lcfg, tokenizer, prompts: Sequence[Sequence[int]],
                       rcfg: RankingConfig = RankingConfig(), prefix_length: int | None = None,
                       progress=None) -> list[str]:
  """The predicted title (`response_text`) of each prompt, by beam search with the given adapters."""
  generated = beam_generate(base, adapters, cfg, lcfg, prompts, num_beams=rcfg.num_beams,
                            max_new_tokens=rcfg.max_new_tokens, batch_size=rcfg.generation_batch,
                            eos_id=tokenizer.eos_token_id, pad_id=_pad_id(tokenizer), prefix_length=prefix_length,
                            progress=progress)
  return [response_text(tokenizer.decode(tokens, skip_special_tokens=True)) for tokens in generated]


def constrained_items(base, adapters, cfg, lcfg, prompts: Sequence[Sequence[int]], catalog: Catalog, *,
                      num_beams: int, batch_size: int, eos_id: int, pad_id: int, prefix_length: int | None = None,
                      progress=None) -> np.ndarray:
  """int64 [N]: the item of the top beam of a search restricted to catalog responses (-1: none finished)."""
  longest = max(len(r) for r in catalog.responses)  # every title can finish: its EOS fits
  generated = beam_generate(base, adapters, cfg, lcfg, prompts, num_beams=num_beams, max_new_tokens=longest,
                            batch_size=batch_size, eos_id=eos_id, pad_id=pad_id, trie=catalog.trie,
                            prefix_length=prefix_length, progress=progress)
  return trie_lib.lookup(catalog.trie, generated)


def _pad_id(tokenizer) -> int:
  return 0 if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)


# ----------------------------------------------------------------------------------------------------
# The catalog and the three modes


@dataclasses.dataclass
class Catalog:
  """The catalog prepared for ranking (item id = index of its title)."""

  titles: tuple[str, ...]
  embed_tokens: list[list[int]]  # BOS + tokens(title): what grounding embeds
  responses: list[list[int]]  # the tokens of '"title"' as a response, then EOS
  item_embeddings: np.ndarray | None  # float32 [I, D], base model (grounding and constrained modes)
  trie: trie_lib.Trie | None  # over `responses` (constrained mode)


def prepare_catalog(base, cfg, tokenizer, titles: Sequence[str], reference_prompts: str | Sequence[str],
                    rcfg: RankingConfig = RankingConfig(), cache_dir=None, params_key: str | None = None) -> Catalog:
  """Tokens, embeddings (cached under `cache_dir`) and trie of the catalog, as far as `rcfg.mode` needs.

  reference_prompts: one or more prompt texts (up to and including "### Response:\\n") from which the
  titles' response tokens are derived and checked (see `response_tokens`).
  """
  embed_tokens = embedding_tokens(tokenizer, titles)
  responses = response_tokens(tokenizer, reference_prompts, titles)
  item_embeddings = trie = None
  if rcfg.mode in ("grounding", "constrained"):
    item_embeddings = grounding.item_embeddings(base, cfg, embed_tokens, cache_dir, rcfg.embed_batch,
                                                bigrec_positions=rcfg.bigrec_positions, params_key=params_key)
  if rcfg.mode == "constrained":
    trie = trie_lib.build_trie(responses)
  return Catalog(tuple(titles), embed_tokens, responses, item_embeddings, trie)


class Ranking(NamedTuple):
  items: np.ndarray  # int64 [N, max(ks)] item ids, best first (-1: no item left)
  predictions: list[str]  # per user: the generated title (grounding), the chosen or the most likely title


def rank_client(base, adapters, cfg, lcfg, tokenizer, catalog: Catalog, prompts: Sequence[Sequence[int]],
                histories: Sequence[Sequence[int]], rcfg: RankingConfig = RankingConfig(),
                prefix_length: int | None = None, progress=None) -> Ranking:
  """Rank the catalog for one client's test prompts with that client's adapters (history excluded).

  prefix_length: how many leading tokens all prompts share (encoded once; default: found from `prompts`);
  progress(n): called after each batch of n prompts.
  """
  k = max(rcfg.ks)
  eos_id, pad_id = tokenizer.eos_token_id, _pad_id(tokenizer)
  shared = dict(prefix_length=prefix_length, progress=progress)
  if rcfg.mode == "likelihood":
    items, _ = likelihood.rank_by_likelihood(
        base, adapters, cfg, lcfg, prompts, catalog.responses, histories, k,
        prompt_batch=rcfg.likelihood_prompt_batch, title_tokens=rcfg.likelihood_title_tokens, pad_id=pad_id,
        **shared)
    return Ranking(items, [catalog.titles[i] if i >= 0 else "" for i in items[:, 0]])
  if rcfg.mode == "constrained":
    chosen = constrained_items(base, adapters, cfg, lcfg, prompts, catalog, num_beams=rcfg.num_beams,
                               batch_size=rcfg.generation_batch, eos_id=eos_id, pad_id=pad_id, **shared)
    predictions = [catalog.titles[i] if i >= 0 else "" for i in chosen]
    pred_emb = catalog.item_embeddings[np.maximum(chosen, 0)]
    if (chosen < 0).any():  # no beam finished a title (cannot happen with full-length beams): embed ""
      pred_emb[chosen < 0] = _embed(base, cfg, tokenizer, [""], rcfg)[0]
  else:
    predictions = generate_responses(base, adapters, cfg, lcfg, tokenizer, prompts, rcfg, **shared)
    pred_emb = _embed(base, cfg, tokenizer, predictions, rcfg)
  items = grounding.rank_by_distance(pred_emb, catalog.item_embeddings, histories, k, block=rcfg.distance_block)
  return Ranking(items, predictions)


def _embed(base, cfg, tokenizer, texts, rcfg: RankingConfig) -> np.ndarray:
  return grounding.embed_texts(base, cfg, embedding_tokens(tokenizer, texts), rcfg.embed_batch,
                               bigrec_positions=rcfg.bigrec_positions)


# ----------------------------------------------------------------------------------------------------
# All clients


def select_client(stacked_adapters, client: int):
  """One client's adapters from a pytree with a leading client axis."""
  return jax.tree.map(lambda x: x[client], stacked_adapters)


class ClientResult(NamedTuple):
  metrics: dict  # metrics.topk_metrics of the client's test cases
  num_test_users: int  # its cases with ground truth (its weight in `overall`)
  ranking: Ranking


def rank_clients(base, cfg, lcfg, tokenizer, catalog: Catalog, client_adapters, client_cases,
                 rcfg: RankingConfig = RankingConfig(), clients=None) -> dict[int, ClientResult]:
  """The result of each client in `clients` (default: all) that has test cases, with its own adapters.

  client_adapters: a list of adapter pytrees, or one pytree with a leading client axis.
  client_cases: per client, test cases with `prompt_ids`, `target_item_ids` and `history_item_ids`
  (the data layer's TestCase).
  """
  clients = range(len(client_cases)) if clients is None else clients
  todo = [int(c) for c in clients if client_cases[c]]
  # The instruction template every prompt starts with: one prefix length for all clients (one compiled shape).
  shared = generation.common_prefix_length([case.prompt_ids for c in todo for case in client_cases[c]])
  results = {}
  with tqdm(total=sum(len(client_cases[c]) for c in todo), desc=f"evaluating ({rcfg.mode})", unit="prompt",
            disable=not todo) as bar:
    for client in todo:
      bar.set_postfix(client=client)
      cases = client_cases[client]
      adapters = client_adapters[client] if isinstance(client_adapters, (list, tuple)) else select_client(
          client_adapters, client)
      ranking = rank_client(base, adapters, cfg, lcfg, tokenizer, catalog, [c.prompt_ids for c in cases],
                            [c.history_item_ids for c in cases], rcfg, prefix_length=shared, progress=bar.update)
      truth = [c.target_item_ids for c in cases]
      results[client] = ClientResult(metrics.topk_metrics(ranking.items, truth, rcfg.ks),
                                     sum(1 for t in truth if len(t)), ranking)
  return results


def report_of(results: dict[int, ClientResult]) -> dict:
  """eval.json's report from the clients' results: each client weighted by its cases with ground truth,
  so `overall` is the mean over all those cases."""
  clients = sorted(results)
  return metrics.client_report([results[c].metrics for c in clients], [results[c].num_test_users for c in clients],
                               clients)


def evaluate_clients(base, cfg, lcfg, tokenizer, catalog: Catalog, client_adapters, client_cases,
                     rcfg: RankingConfig = RankingConfig()) -> tuple[dict, dict[int, Ranking]]:
  """(eval.json report, rankings by client) of every client's test cases with its own adapters; a client
  without test cases is left out (see rank_clients)."""
  results = rank_clients(base, cfg, lcfg, tokenizer, catalog, client_adapters, client_cases, rcfg)
  return report_of(results), {c: r.ranking for c, r in results.items()}
