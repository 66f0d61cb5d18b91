"""Greedy and beam search equal transformers' generate(do_sample=False), token for token, with or without a
prompt prefix encoded once."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import TINY_CONFIGS, make_hf_model, to_ours
from fellrec_jax.evaluation import grounding
from fellrec_jax.model import generation
from fellrec_jax.model import llama as model_lib
from fellrec_jax.model import lora
from test_lora import peft_model, randomize

LCFG = lora.LoraConfig(rank=4, dropout=0.0)
MAX_NEW = 16


@pytest.fixture(scope="module")
def peaky(tmp_path_factory):
  """A tiny model whose next-token distributions are peaked, so EOS and repetitions occur."""
  hf = make_hf_model(seed=3, vocab_size=61, num_hidden_layers=2, **TINY_CONFIGS["mqa"])
  with torch.no_grad():
    hf.lm_head.weight.mul_(6.0)
    # EOS resembles a frequent token, so that some rows stop early and others run to max_new_tokens.
    hf.lm_head.weight[2] = 0.5 * hf.lm_head.weight[2] + 0.9 * hf.lm_head.weight[8]
  cfg, params = to_ours(hf, tmp_path_factory.mktemp("peaky"))
  rs = np.random.RandomState(0)
  ids = rs.randint(3, cfg.vocab_size, (4, 9))
  mask = np.ones_like(ids)
  mask[1, :3] = mask[2, :5] = mask[3, :1] = 0
  ids[mask == 0] = 0
  return hf, cfg, params, ids, mask


def hf_generate(hf, ids, mask, num_beams):
  with torch.no_grad():
    out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=MAX_NEW,
                      num_beams=num_beams, do_sample=False, eos_token_id=2, pad_token_id=0)
  return out.numpy()[:, ids.shape[1]:]


def assert_same_tokens(ours: generation.Output, ref: np.ndarray):
  tokens, lengths = np.asarray(ours.tokens), np.asarray(ours.lengths)
  for row in range(ref.shape[0]):
    eos = np.flatnonzero(ref[row] == 2)
    n = eos[0] + 1 if len(eos) else MAX_NEW
    assert lengths[row] == n, row
    np.testing.assert_array_equal(tokens[row, :n], ref[row, :n])


def test_greedy_equals_transformers(peaky):
  hf, cfg, params, ids, mask = peaky
  ref = hf_generate(hf, ids, mask, 1)
  out = generation.greedy(params, {}, ids, mask, cfg=cfg, lcfg=LCFG, max_new_tokens=MAX_NEW, eos_id=2, pad_id=0)
  assert (ref == 2).any() and not (ref == 2).any(axis=1).all()  # some rows stop early, others do not
  assert_same_tokens(out, ref)


def test_greedy_with_adapters_equals_peft(peaky):
  hf, cfg, params, ids, mask = peaky
  adapters = randomize(lora.init_adapters(cfg, LCFG, jax.random.PRNGKey(0)), scale=0.3)
  reference = peft_model(hf, LCFG, adapters)
  ref = hf_generate(reference, ids, mask, 1)
  reference.unload()
  out = generation.greedy(params, adapters, ids, mask, cfg=cfg, lcfg=LCFG, max_new_tokens=MAX_NEW, eos_id=2,
                          pad_id=0)
  assert not np.array_equal(ref, hf_generate(hf, ids, mask, 1))  # the adapters change the output
  assert_same_tokens(out, ref)


def test_four_beam_search_equals_transformers(peaky):
  hf, cfg, params, ids, mask = peaky
  ref = hf_generate(hf, ids, mask, 4)
  out = generation.beam_search(params, {}, ids, mask, cfg=cfg, lcfg=LCFG, max_new_tokens=MAX_NEW, num_beams=4,
                               eos_id=2, pad_id=0)
  assert (ref == 2).any()
  assert_same_tokens(out, ref)
  greedy = generation.greedy(params, {}, ids, mask, cfg=cfg, lcfg=LCFG, max_new_tokens=MAX_NEW, eos_id=2, pad_id=0)
  assert not np.array_equal(np.asarray(greedy.tokens), np.asarray(out.tokens))  # beams found other sequences


def test_beam_scores_match_transformers(peaky):
  hf, cfg, params, ids, mask = peaky
  with torch.no_grad():
    out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=MAX_NEW, num_beams=3,
                      do_sample=False, eos_token_id=2, pad_token_id=0, output_scores=True,
                      return_dict_in_generate=True)
  ours = generation.beam_search(params, {}, ids, mask, cfg=cfg, lcfg=LCFG, max_new_tokens=MAX_NEW, num_beams=3,
                                eos_id=2, pad_id=0)
  np.testing.assert_allclose(np.asarray(ours.scores), out.sequences_scores.numpy(), rtol=1e-5)


def prefixed_prompts(cfg):
  """Prompts that share their first 5 tokens, then 1 to 6 of their own: (prefix, suffixes, left-padded
  whole prompts and mask)."""
  rs = np.random.RandomState(1)
  prefix = rs.randint(3, cfg.vocab_size, 5).tolist()
  suffixes = [rs.randint(3, cfg.vocab_size, n).tolist() for n in (3, 6, 1, 4)]
  whole = [prefix + s for s in suffixes]
  ids, mask = grounding.left_pad(whole, max(map(len, whole)), len(whole))
  return prefix, suffixes, ids, mask


def test_beam_search_after_a_shared_prefix_equals_transformers(peaky):
  """The prefix encoded once, the prompts' own tokens left-padded after it: the same beams as whole prompts."""
  hf, cfg, params, _, _ = peaky
  prefix, suffixes, ids, mask = prefixed_prompts(cfg)
  ref = hf_generate(hf, ids, mask, 4)
  encoded = generation.encode_prefix(params, {}, np.asarray(prefix, np.int32), cfg=cfg, lcfg=LCFG)
  want = (cfg.num_kv_heads, cfg.head_dim, 5)
  assert [encoded.k[i].shape for i in range(cfg.num_layers)] == [want] * cfg.num_layers
  suffix_ids, suffix_mask = grounding.left_pad(suffixes, 8, len(suffixes))  # more padding than needed
  out = generation.beam_search(params, {}, suffix_ids, suffix_mask, cfg=cfg, lcfg=LCFG, max_new_tokens=MAX_NEW,
                               num_beams=4, eos_id=2, pad_id=0, prefix=encoded)
  assert_same_tokens(out, ref)
  whole = generation.beam_search(params, {}, ids, mask, cfg=cfg, lcfg=LCFG, max_new_tokens=MAX_NEW, num_beams=4,
                                 eos_id=2, pad_id=0)
  np.testing.assert_allclose(np.asarray(out.scores), np.asarray(whole.scores), rtol=1e-5)
  greedy = generation.greedy(params, {}, suffix_ids, suffix_mask, cfg=cfg, lcfg=LCFG, max_new_tokens=MAX_NEW,
                             eos_id=2, pad_id=0, prefix=encoded)
  assert_same_tokens(greedy, hf_generate(hf, ids, mask, 1))


def test_split_prefix_takes_the_common_tokens():
  assert generation.common_prefix_length([[1, 5, 6, 7], [1, 5, 6, 9, 9], [1, 5, 6, 7, 2]]) == 3
  assert generation.common_prefix_length([[1, 5, 6], [1, 5, 6, 7]]) == 2  # every prompt keeps a token
  assert generation.common_prefix_length([[4, 5]]) == 1 and generation.common_prefix_length([]) == 0
  with pytest.raises(ValueError, match="prompt 1 does not start with the 2 shared prefix tokens"):
    generation.split_prefix(None, {}, None, LCFG, [[1, 5, 6], [1, 4, 6]], prefix_length=2)


def test_scanned_layers_give_the_same_beams(peaky, monkeypatch):
  """Models deeper than UNROLL_LAYERS run their layers as a scan with the cache in the carry (stacked
  [L, ...] arrays, not one per layer): the same beams, also after a prefix encoded with unrolled layers."""
  hf, cfg, params, _, _ = peaky
  prefix, suffixes, ids, mask = prefixed_prompts(cfg)
  suffix_ids, suffix_mask = grounding.left_pad(suffixes, 8, len(suffixes))
  encoded = generation.encode_prefix(params, {}, np.asarray(prefix, np.int32), cfg=cfg, lcfg=LCFG)
  assert isinstance(encoded.k, tuple)  # one array per layer
  kwargs = dict(cfg=cfg, lcfg=LCFG, max_new_tokens=MAX_NEW, num_beams=4, eos_id=2, pad_id=0)
  search = lambda: functools.partial(generation.beam_search.__wrapped__, **kwargs)  # a new function: traced anew
  has_scan = lambda: "scan[" in str(jax.make_jaxpr(search())(params, {}, ids, mask))
  unrolled = [generation.beam_search(params, {}, ids, mask, **kwargs),
              generation.beam_search(params, {}, suffix_ids, suffix_mask, prefix=encoded, **kwargs)]
  assert not has_scan()
  monkeypatch.setattr(model_lib, "UNROLL_LAYERS", 1)
  assert has_scan()
  scanned = [jax.jit(search())(params, {}, ids, mask),
             jax.jit(search())(params, {}, suffix_ids, suffix_mask, prefix=encoded)]
  for got, want in zip(scanned, unrolled):
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.scores), np.asarray(want.scores), rtol=1e-5)


@pytest.mark.parametrize("concat", [True, False])
def test_attend_segments_equals_one_softmax_over_all_keys(concat):
  """Segments read by every row, by groups of rows and by each row (masks, one all-masked segment for some
  rows), with one softmax over concatenated scores or merged per segment: plain attention over the keys."""
  rs = np.random.RandomState(0)
  R, K, G, H, groups = 6, 2, 2, 4, 3
  for T in (1, 3):
    q = rs.randn(R, T, K, G, H).astype(np.float32)
    sizes = {1: 5, groups: 4, R: 2}  # rows per group of keys: all, pairs, each row its own (T = 1 only)
    segments, keys, values, masks = [], [], [], []
    for Rk, S in sizes.items():
      if Rk == R and T != 1:
        continue
      k, v = rs.randn(Rk, S, K, H).astype(np.float32), rs.randn(Rk, S, K, H).astype(np.float32)
      mask = rs.rand(Rk, R // Rk, T, S) < 0.7
      mask[:, 0] = Rk != groups  # the first row of each pair sees none of its pair's keys
      per_row = Rk == R  # each row its own keys, given in the row layout
      segments.append(generation.Segment(k, v, mask, per_row=True) if per_row else
                      generation.Segment(generation.as_keys(k), generation.as_values(v), mask))
      row_keys = lambda x: np.repeat(x, R // Rk, axis=0)  # [R, S, K, H]
      keys.append(row_keys(k))
      values.append(row_keys(v))
      masks.append(mask.reshape(R, T, S))
    got = generation.attend_segments(jnp.asarray(q), segments, 0.5, concat=concat)
    k, v, mask = np.concatenate(keys, axis=1), np.concatenate(values, axis=1), np.concatenate(masks, axis=-1)
    s = np.einsum("rtkgh,rskh->rtkgs", q, k) * 0.5
    s = np.where(mask[:, :, None, None, :], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("rtkgs,rskh->rtkgh", p / p.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  one_per_row = generation.Segment(jnp.zeros((R, 2, K, H)), jnp.zeros((R, 2, K, H)), per_row=True)
  with pytest.raises(ValueError, match="per-row segment needs one query per row"):
    generation.attend_segments(jnp.zeros((R, 3, K, G, H)), [one_per_row], 0.5)
