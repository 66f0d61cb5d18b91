"""Catalog likelihood equals a full forward per title; constrained beam search equals transformers'
prefix_allowed_tokens_fn and only ever returns catalog titles."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import TINY_CONFIGS, make_hf_model, to_ours
from fellrec_jax.model import generation
from fellrec_jax.evaluation import grounding
from fellrec_jax.evaluation import likelihood
from fellrec_jax.model import lora
from fellrec_jax.evaluation import recommend
from fellrec_jax.federated import sharding
from fellrec_jax.model import llama as model_lib
from fellrec_jax.model import trie as trie_lib
from test_lora import randomize

TITLES = ["Halo 3 - Xbox 360", "Halo 3: ODST - Xbox 360", "Super Mario Odyssey - Nintendo Switch",
          "Mario Kart 8 Deluxe - Nintendo Switch", "The Legend of Zelda: Breath of the Wild - Nintendo Switch",
          " Minecraft - PC", "Gravity Rush Remastered - PlayStation 4", 'Rock Band "Special" Edition - Wii',
          "FIFA 18 - PlayStation 4", "Portal 2 - PC", "Portal - PC", "Tetris &amp; Dr. Mario - SNES"]
LCFG = lora.LoraConfig(rank=4, dropout=0.0)


def prompt_text(history):
  """A short Alpaca-like prompt that ends, like docs/method.md §1's, with "### Response:\\n"."""
  return "### Input:\nThe user played " + ", ".join(f'"{t}"' for t in history) + "\n\n### Response:\n"


def train_tokenizer(texts, vocab_size=420):
  """A byte-level BPE (exact round trips) with <unk>, <s>, </s>, <pad> at ids 0..3, as the data layer's."""
  bpe = Tokenizer(models.BPE(unk_token="<unk>"))
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>")


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
  """(tokenizer, hf model, cfg, params, prompt texts, prompt token lists) over the 12 titles."""
  n = len(TITLES)
  tokenizer = train_tokenizer([prompt_text([TITLES[i - 1], TITLES[i - 2]]) + f'"{t}"' for i, t in enumerate(TITLES)])
  hf = make_hf_model(seed=5, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     **TINY_CONFIGS["gqa"])
  cfg, params = to_ours(hf, tmp_path_factory.mktemp("shop"))
  texts = [prompt_text([TITLES[(3 * i) % n] for i in range(j)]) for j in (1, 4, 2)]
  prompts = [[tokenizer.bos_token_id] + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
  return tokenizer, hf, cfg, params, texts, prompts


def brute_force_scores(logits_fn, prompts, responses):
  """[N, I] summed log-probs of each response after each prompt, from a full forward of every
  prompt + response (one right-padded batch: causal attention makes the padding harmless)."""
  sequences = [prompt + response[:-1] for prompt in prompts for response in responses]
  ids = np.zeros((len(sequences), max(map(len, sequences))), np.int64)
  for row, sequence in enumerate(sequences):
    ids[row, :len(sequence)] = sequence
  logits = np.asarray(logits_fn(ids), np.float64)
  logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  out = np.zeros((len(prompts), len(responses)))
  for n, prompt in enumerate(prompts):
    for i, response in enumerate(responses):
      row = logp[n * len(responses) + i]
      out[n, i] = sum(row[len(prompt) - 1 + j, token] for j, token in enumerate(response))
  return out


def scores_matrix(ranked, scores, num_items):
  out = np.full((len(ranked), num_items), -np.inf)
  np.put_along_axis(out, ranked, scores, axis=1)
  return out


@pytest.fixture(params=["unrolled", "scanned"])
def layers(request, monkeypatch):
  """The model's layers unrolled (one cache array per layer) or, as in models deeper than UNROLL_LAYERS, a
  scan over stacked caches; the jit caches are cleared so that every program is traced for this form."""
  if request.param == "scanned":
    monkeypatch.setattr(model_lib, "UNROLL_LAYERS", 1)
  jax.clear_caches()
  yield request.param
  jax.clear_caches()


def test_catalog_likelihood_equals_full_forward_of_each_title(shop, layers):
  tokenizer, hf, cfg, params, texts, prompts = shop
  responses = recommend.response_tokens(tokenizer, texts, TITLES)
  with torch.no_grad():
    ref = brute_force_scores(lambda ids: hf(torch.tensor(ids)).logits.numpy(), prompts, responses)
  # Blocks of ~40 title tokens and 2 prompts: several blocks, left-padded prompts, a partly filled block.
  ranked, scores = likelihood.rank_by_likelihood(params, {}, cfg, LCFG, prompts, responses, [[]] * 3, len(TITLES),
                                                 prompt_batch=2, title_tokens=40)
  got = scores_matrix(ranked, scores, len(TITLES))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  assert (np.diff(scores, axis=1) <= 0).all()  # best first


def test_catalog_likelihood_with_adapters_and_history(shop):
  tokenizer, hf, cfg, params, texts, prompts = shop
  responses = recommend.response_tokens(tokenizer, texts[0], TITLES)
  adapters = randomize(lora.init_adapters(cfg, LCFG, jax.random.PRNGKey(1)), scale=0.3)
  forward = jax.jit(lambda p, a, ids: model_lib.forward(p, a, model_lib.plain_inputs(ids), cfg, LCFG))
  ref = brute_force_scores(lambda ids: forward(params, adapters, ids), prompts, responses)
  exclude = [[int(np.argmax(ref[0]))], [], [0, 1, 2, 3, 4, 5, 6, 7, 8]]  # user 0's best item is history
  ranked, scores = likelihood.rank_by_likelihood(params, adapters, cfg, LCFG, prompts, responses, exclude, 5,
                                                 prompt_batch=4, title_tokens=64)
  for n, banned in enumerate(exclude):
    masked = ref[n].copy()
    masked[banned] = -np.inf
    expected = np.argsort(-masked, kind="stable")[:5]
    expected = np.where(np.isinf(masked[expected]), -1, expected)
    np.testing.assert_array_equal(ranked[n], expected)
    np.testing.assert_allclose(scores[n][expected >= 0], masked[expected[expected >= 0]], rtol=1e-5, atol=1e-5)


def test_likelihood_compiles_one_block_program_per_block_shape(shop):
  """With the base placed on a mesh, as a run places it, a prompt batch's first block runs the program
  of the blocks after it (its empty top-k is typed as theirs)."""
  tokenizer, hf, cfg, params, texts, prompts = shop
  responses = recommend.response_tokens(tokenizer, texts, TITLES)
  shapes = {tuple(np.shape(x) for x in jax.tree.leaves(block)) for _, block in likelihood.trie_blocks(responses, 40)[1]}
  base = sharding.put_base(params, sharding.make_mesh())
  likelihood._score_block.clear_cache()
  likelihood.rank_by_likelihood(base, {}, cfg, LCFG, prompts, responses, [[]] * 3, 5, prompt_batch=2, title_tokens=40)
  assert likelihood._score_block._cache_size() == len(shapes) > 1


def test_trie_csr_lookups():
  sequences = [[5, 6, 2], [5, 7, 2], [5, 6, 8, 2], [9, 2], [5, 6, 2]]  # the last repeats item 0
  trie = trie_lib.build_trie(sequences)
  assert trie.num_nodes == 10 and trie.max_children == 2 and trie.child_tokens.shape == (9,)
  np.testing.assert_array_equal(trie_lib.lookup(trie, sequences + [[5, 6], [5, 6, 8, 3], []]),
                                [0, 1, 2, 3, 0, -1, -1, -1])
  nodes = jax.numpy.array([0, 0, 0, -1])
  allowed = np.asarray(trie_lib.allowed_tokens(trie, nodes, 12))
  assert [np.flatnonzero(row).tolist() for row in allowed] == [[5, 9], [5, 9], [5, 9], []]
  nodes = trie_lib.advance(trie, nodes, jax.numpy.array([5, 9, 4, 5]))
  assert np.asarray(nodes)[2:].tolist() == [-1, -1]  # a token outside the trie and a dead node stay dead
  allowed = np.asarray(trie_lib.allowed_tokens(trie, nodes, 12))
  assert [np.flatnonzero(row).tolist() for row in allowed[:2]] == [[6, 7], [2]]


def allowed_fn(trie, prompt_len, vocab_size):
  """transformers' prefix_allowed_tokens_fn walking the same trie (all tokens once a beam left it)."""
  def fn(batch_id, input_ids):
    node = jax.numpy.zeros((1,), jax.numpy.int32)
    for token in input_ids[prompt_len:].tolist():
      node = trie_lib.advance(trie, node, jax.numpy.array([token]))
    allowed = np.flatnonzero(np.asarray(trie_lib.allowed_tokens(trie, node, vocab_size))[0]).tolist()
    return allowed or list(range(vocab_size))  # dead beams carry -inf scores either way
  return fn


def test_constrained_beam_search_equals_transformers(shop):
  tokenizer, hf, cfg, params, texts, prompts = shop
  responses = recommend.response_tokens(tokenizer, texts, TITLES)
  trie = trie_lib.build_trie(responses)
  max_new = max(map(len, responses))
  eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
  ids, mask = recommend.grounding.left_pad(prompts, max(map(len, prompts)), len(prompts), pad)
  ours = generation.beam_search(params, {}, ids, mask, cfg=cfg, lcfg=LCFG, max_new_tokens=max_new, num_beams=4,
                                eos_id=eos, pad_id=pad, trie=trie)
  for row in range(len(prompts)):
    with torch.no_grad():
      ref = hf.generate(torch.tensor(ids[row:row + 1]), attention_mask=torch.tensor(mask[row:row + 1]),
                        max_new_tokens=max_new, num_beams=4, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                        prefix_allowed_tokens_fn=allowed_fn(trie, ids.shape[1], cfg.vocab_size))
    ref = ref[0, ids.shape[1]:].numpy()
    n = int(ours.lengths[row])
    np.testing.assert_array_equal(np.asarray(ours.tokens)[row, :n], ref[:n])
    assert ref[n - 1] == eos and (n == len(ref) or (ref[n:] == pad).all())
  items = trie_lib.lookup(trie, [np.asarray(ours.tokens)[r, :int(ours.lengths[r])] for r in range(len(prompts))])
  assert (items >= 0).all()  # every answer is exactly a catalog title


def biased_toward(params, cfg, tokens):
  """Params whose logits favour `tokens` at every position: a constant, dominant residual direction
  (embedding dimension 0) read out by the head only for those tokens."""
  embed = np.array(params["embed_tokens"]["embedding"])
  embed[:, 0] += 50.0
  head = np.array(model_lib.head_weight(params))
  head[0] = 0.0
  head[0, tokens] = 5.0
  return dict(params, embed_tokens={"embedding": embed}, lm_head={"kernel": head})


def test_constrained_search_follows_a_biased_model(shop):
  tokenizer, hf, cfg, params, texts, prompts = shop
  catalog = recommend.prepare_catalog(params, cfg, tokenizer, TITLES, texts[0],
                                      recommend.RankingConfig(mode="constrained"))
  for target in (4, 10):  # a long title, and one that shares its start with another ("Portal 2 - PC")
    biased = biased_toward(params, cfg, catalog.responses[target])
    chosen = recommend.constrained_items(biased, {}, cfg, LCFG, prompts, catalog, num_beams=4, batch_size=2,
                                         eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    np.testing.assert_array_equal(chosen, [target] * len(prompts))
    free = recommend.generate_responses(biased, {}, cfg, LCFG, tokenizer, prompts[:1],
                                        recommend.RankingConfig(max_new_tokens=12))
    assert free[0] not in TITLES  # unconstrained, the biased model babbles: the trie is what keeps it valid


def test_trie_blocks_hold_every_title_once_within_the_node_budget():
  rs = np.random.RandomState(0)
  # Titles that share leading tokens (a small alphabet), of 1 to 12 tokens, a few repeated.
  responses = [list(rs.randint(0, 4, rs.randint(1, 13))) for _ in range(300)]
  responses += responses[:5]
  order, blocks = likelihood.trie_blocks(responses, 64, pad_id=9)
  assert sorted(order.tolist()) == list(range(len(responses)))
  bucket = lambda r: grounding.padded_length(len(r), minimum=4)
  assert [(bucket(responses[i]), tuple(responses[i])) for i in order] == sorted(
      (bucket(r), tuple(r)) for r in responses)
  # One shape per length bucket (few compilations), the depth that of the block's longest title.
  assert len({jax.tree.map(np.shape, block) for _, block in blocks}) <= len({bucket(r) for r in responses})
  seen = []
  for (offset, block), nxt in zip(blocks, [b[0] for b in blocks[1:]] + [len(order)]):
    items = block.ids[block.ids >= 0]
    np.testing.assert_array_equal(items, order[offset:nxt])  # consecutive places, in order
    used = set()
    for row, item in enumerate(items):
      response = responses[item]
      assert block.first[row] == response[0]
      for j in range(len(response) - 1):  # node j holds the title's token j and predicts token j + 1
        node = block.title_nodes[row, j]
        used.add(node)
        assert block.tokens[node] == response[j] and block.depth[node] == j
        assert block.targets[row, j] == response[j + 1] and block.valid[row, j]
        np.testing.assert_array_equal(block.tokens[block.path[node, :j + 1]], response[:j + 1])
      assert not block.valid[row, len(response) - 1:].any()
    prefixes = {tuple(responses[i][:j + 1]) for i in items for j in range(len(responses[i]) - 1)}
    assert len(used) == len(prefixes) <= 64  # one node per distinct prefix, within the budget
    assert block.path.shape[1] == grounding.padded_length(max(len(responses[i]) for i in items) - 1, minimum=4)
    seen += items.tolist()
  assert len(seen) == len(responses) and len(blocks) > 1


def test_bench_ranking_sides_in_their_own_processes_rank_alike():
  """tools/bench_ranking.py --torch: the PyTorch process rebuilds the same tokenizer, model and prompts from
  the seeds (its generated titles and top items equal ours), and each mode's ratio is reported."""
  root = Path(__file__).resolve().parents[1]
  run = subprocess.run([sys.executable, "tools/bench_ranking.py", "--items", "40", "--prompts", "4", "--max_new_tokens",
                        "6", "--hidden", "32", "--layers", "1", "--vocab", "400", "--reps", "1", "--torch",
                        "--modes", "grounding,likelihood"], cwd=root, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0, run.stderr[-3000:]
  assert "same prediction: 100%" in run.stdout and "same top item: 100%" in run.stdout, run.stdout
  assert run.stdout.count("speedup") == 2
