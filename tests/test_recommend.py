"""Recommendation end to end on a tiny model: response parsing, tokens consistent with training,
generation equal to BIGRec's transformers procedure (in the prompts' order whatever the batching), the three
ranking modes, and the client report."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fellrec_jax.evaluation import grounding
from fellrec_jax.model import lora
from fellrec_jax.evaluation import metrics
from fellrec_jax.evaluation import recommend
from test_lora import randomize
from test_ranking import LCFG, TITLES, shop  # noqa: F401  (shop is a fixture)

KS = (1, 3, 5)


class Case(NamedTuple):
  """The data layer's TestCase fields that evaluation reads."""
  prompt_ids: list
  target_item_ids: tuple
  history_item_ids: tuple


@pytest.mark.parametrize("generated, expected", [
    ('"Halo 3 - Xbox 360"', "Halo 3 - Xbox 360"),
    ('  "Rock Band "Special" Edition - Wii"\n', 'Rock Band "Special" Edition - Wii'),  # inner quotes kept
    ('" Minecraft - PC"', " Minecraft - PC"),  # a title's leading space is part of it
    ('junk ### Response:\n"Portal - PC"', "Portal - PC"),  # the text after the last marker
    ("Portal - PC", "Portal - PC"),
])
def test_response_text(generated, expected):
  assert recommend.response_text(generated) == expected


def test_response_tokens_match_the_training_encoding(shop):
  tokenizer, hf, cfg, params, texts, prompts = shop
  responses = recommend.response_tokens(tokenizer, texts, TITLES)
  for text, prompt in zip(texts, prompts):
    for title, response in zip(TITLES, responses):
      # The data layer: BOS + tokens(prompt + output) in one call + EOS; generation: BOS + tokens(prompt).
      example = [tokenizer.bos_token_id] + tokenizer(f'{text}"{title}"', add_special_tokens=False)["input_ids"]
      assert example + [tokenizer.eos_token_id] == prompt + response
  with pytest.raises(ValueError, match="not a prefix"):
    recommend.response_tokens(tokenizer, "played x, ", TITLES)  # ' "' is one token: merges across the end


def test_generation_equals_bigrec_procedure(shop):
  tokenizer, hf, cfg, params, texts, prompts = shop
  rcfg = recommend.RankingConfig(max_new_tokens=10, generation_batch=2)
  ours = recommend.generate_responses(params, {}, cfg, LCFG, tokenizer, prompts, rcfg)
  for prompt, got in zip(prompts, ours):
    with torch.no_grad():
      out = hf.generate(torch.tensor([prompt]), max_new_tokens=10, num_beams=4, do_sample=False,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.batch_decode(out, skip_special_tokens=True)[0].split("Response:\n")[-1]  # BIGRec
    assert got == recommend.response_text(text)
    assert got  # the random model says something


def test_a_generated_title_ranks_its_item_first(shop):
  tokenizer, hf, cfg, params, texts, prompts = shop
  catalog = recommend.prepare_catalog(params, cfg, tokenizer, TITLES, texts)
  predictions = [recommend.response_text(f'"{TITLES[i]}"\n') for i in (7, 5, 0)]
  pred = recommend._embed(params, cfg, tokenizer, predictions, recommend.RankingConfig())
  ranked = grounding.rank_by_distance(pred, catalog.item_embeddings, [[], [], [0, 1]], 5)
  assert ranked[0, 0] == 7 and ranked[1, 0] == 5
  assert not {0, 1} & set(ranked[2])  # history is never ranked, even the exact match


@pytest.mark.parametrize("mode", recommend.MODES)
def test_rank_client_modes(shop, mode):
  tokenizer, hf, cfg, params, texts, prompts = shop
  rcfg = recommend.RankingConfig(mode=mode, ks=KS, max_new_tokens=8, generation_batch=2)
  catalog = recommend.prepare_catalog(params, cfg, tokenizer, TITLES, texts, rcfg)
  histories = [[0, 1, 2], [], list(range(9))]
  ranking = recommend.rank_client(params, {}, cfg, LCFG, tokenizer, catalog, prompts, histories, rcfg)
  assert ranking.items.shape == (3, 5) and len(ranking.predictions) == 3
  for row, history in zip(ranking.items, histories):
    real = row[row >= 0]
    assert len(set(real)) == len(real) and not set(history) & set(real)
    assert len(real) == min(5, len(TITLES) - len(history))
  if mode == "likelihood":  # the most likely title is ranked first
    assert [TITLES[i] for i in ranking.items[:, 0]] == ranking.predictions
  if mode == "constrained":  # the chosen title is ranked first, unless it is history (then it is dropped)
    chosen = [TITLES.index(p) for p in ranking.predictions]
    for row, item, history in zip(ranking.items, chosen, histories):
      assert row[0] == item if item not in history else item not in row


def test_evaluate_clients_report(shop):
  tokenizer, hf, cfg, params, texts, prompts = shop
  rcfg = recommend.RankingConfig(mode="likelihood", ks=KS)
  catalog = recommend.prepare_catalog(params, cfg, tokenizer, TITLES, texts, rcfg)
  adapters = [randomize(lora.init_adapters(cfg, LCFG, jax.random.PRNGKey(c)), scale=0.3) for c in range(3)]
  cases = [[Case(prompts[0], (3, 4), (0,)), Case(prompts[1], (), (1,)), Case(prompts[2], (5,), ())],
           [],  # a client without test users is left out
           [Case(prompts[1], (6,), (2, 3))]]
  report, rankings = recommend.evaluate_clients(params, cfg, LCFG, tokenizer, catalog, adapters, cases, rcfg)
  names = metrics.metric_names(KS)
  assert list(report) == ["overall", "clients", "balance"]
  assert list(report["overall"]) == names and list(report["balance"]) == names
  assert [(c["client"], c["num_test_users"]) for c in report["clients"]] == [(0, 2), (2, 1)]
  assert all(list(c)[2:] == names for c in report["clients"])
  # Weighting by users with ground truth makes `overall` the mean over all of them.
  items = np.concatenate([rankings[0].items, rankings[2].items])
  pooled = metrics.topk_metrics(items, [c.target_item_ids for c in cases[0] + cases[2]], KS)
  assert report["overall"] == pytest.approx(pooled)
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *adapters)
  again, _ = recommend.evaluate_clients(params, cfg, LCFG, tokenizer, catalog, stacked, cases, rcfg)
  assert again["overall"] == pytest.approx(report["overall"])


def test_batches_sorted_by_length_return_results_in_prompt_order(shop):
  """Generation sorts prompts by length into batches; results come back in the prompts' order, the same
  whatever the batching, and progress is reported per batch."""
  tokenizer, hf, cfg, params, texts, prompts = shop
  kwargs = dict(num_beams=2, max_new_tokens=6, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
  permuted = [prompts[i] for i in (2, 0, 1)]
  assert sorted(map(len, permuted)) != list(map(len, permuted))  # the batches reorder them
  # One by one, without a prefix; together, the shared prefix encoded once.
  one_by_one = [recommend.beam_generate(params, {}, cfg, LCFG, [p], batch_size=1, prefix_length=0, **kwargs)[0]
                for p in permuted]
  done = []
  together = recommend.beam_generate(params, {}, cfg, LCFG, permuted, batch_size=2, progress=done.append, **kwargs)
  assert done == [2, 1]
  for got, alone in zip(together, one_by_one):
    np.testing.assert_array_equal(got, alone)
