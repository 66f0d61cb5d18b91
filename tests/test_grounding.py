"""Grounding: embeddings equal transformers' hidden_states[-1][:, -1]; blocked L2 ranking equals brute force."""

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIGS, make_hf_model, to_ours
from fellrec_jax.evaluation import grounding


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  hf = make_hf_model(seed=1, num_hidden_layers=2, **TINY_CONFIGS["gqa"])
  cfg, params = to_ours(hf, tmp_path_factory.mktemp("tiny"))
  rs = np.random.RandomState(0)
  texts = [[1] + rs.randint(3, cfg.vocab_size, n).tolist() for n in (5, 9, 3, 12, 7, 7, 2, 10, 4)]
  return hf, cfg, params, texts


def hf_last_hidden(hf, token_lists, position_ids=False):
  """BIGRec's embedding of one left-padded batch: hidden_states[-1][:, -1, :]."""
  ids, mask = grounding.left_pad(token_lists, max(map(len, token_lists)), len(token_lists))
  kwargs = {}
  if position_ids:
    kwargs["position_ids"] = torch.tensor(np.maximum(np.cumsum(mask, axis=1) - 1, 0))
  with torch.no_grad():
    out = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True, **kwargs)
  return out.hidden_states[-1][:, -1, :].numpy()


def test_bigrec_positions_equal_transformers_batches_of_four(tiny):
  hf, cfg, params, texts = tiny
  ours = grounding.embed_texts(params, cfg, texts, batch_size=4, bigrec_positions=True)
  ref = np.concatenate([hf_last_hidden(hf, texts[i:i + 4]) for i in range(0, len(texts), 4)])
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_hidden_states_last_is_after_the_final_norm(tiny):
  hf, cfg, params, texts = tiny
  captured = []
  hook = hf.model.layers[-1].register_forward_hook(lambda module, args, out: captured.append(out))
  ref = hf_last_hidden(hf, texts[:1])
  hook.remove()
  pre_norm = captured[0][0] if isinstance(captured[0], tuple) else captured[0]
  with torch.no_grad():
    np.testing.assert_allclose(ref, hf.model.norm(pre_norm)[:, -1].numpy(), rtol=1e-6, atol=1e-6)
  assert not np.allclose(ref, pre_norm[:, -1].numpy(), atol=1e-2)


def test_default_embedding_ignores_padding_and_batching(tiny):
  hf, cfg, params, texts = tiny
  ours = grounding.embed_texts(params, cfg, texts, batch_size=3)
  padded = hf_last_hidden(hf, texts, position_ids=True)  # one left-padded batch, real-token positions
  alone = np.concatenate([hf_last_hidden(hf, [t]) for t in texts])  # each text without padding
  np.testing.assert_allclose(ours, padded, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours, alone, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grounding.embed_texts(params, cfg, texts[::-1], batch_size=4), ours[::-1],
                             rtol=1e-5, atol=1e-5)


def brute_force(pred, items, exclude, k):
  dist = ((pred[:, None, :].astype(np.float64) - items[None].astype(np.float64)) ** 2).sum(-1)
  for row, banned in enumerate(exclude):
    dist[row, banned] = np.inf
  order = np.argsort(dist, axis=1, kind="stable")[:, :k]
  return np.where(np.isinf(np.take_along_axis(dist, order, 1)), -1, order)


def test_blocked_ranking_equals_brute_force():
  rs = np.random.RandomState(0)
  items = rs.randn(53, 8).astype(np.float32)
  pred = rs.randn(11, 8).astype(np.float32)
  exclude = [rs.choice(53, n, replace=False).tolist() for n in rs.randint(0, 20, 11)]
  expected = brute_force(pred, items, exclude, 10)
  for block, query_block in [(7, 4), (53, 256), (4096, 5)]:
    got = grounding.rank_by_distance(pred, items, exclude, 10, block=block, query_block=query_block)
    np.testing.assert_array_equal(got, expected)


def test_history_is_never_ranked_and_short_catalogs_end_with_no_item():
  items = np.arange(6, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  pred = items[[2, 4]]  # each prediction is exactly an item
  got = grounding.rank_by_distance(pred, items, [[2, 3], [0, 1, 2, 3, 5]], k=5, block=4)
  # Items 0 and 4 tie at distance 2 from item 2 (in different blocks): the lower id comes first.
  np.testing.assert_array_equal(got, [[1, 0, 4, 5, -1], [4, -1, -1, -1, -1]])


def test_a_prediction_equal_to_a_title_ranks_that_item_first(tiny):
  hf, cfg, params, texts = tiny
  catalog = texts[1:]
  items = grounding.embed_texts(params, cfg, catalog, batch_size=4)
  predictions = [catalog[5], catalog[2], catalog[0]]
  pred = grounding.embed_texts(params, cfg, predictions, batch_size=2)  # other batches, other padding
  got = grounding.rank_by_distance(pred, items, [[], [], [0]], k=3)
  assert got[0, 0] == 5 and got[1, 0] == 2
  assert 0 not in got[2]  # the exact match is history: excluded
  dist = np.linalg.norm(pred[0] - items[5])
  assert dist < 1e-5 * np.linalg.norm(items[5])


def test_item_embeddings_are_cached_per_base_and_catalog(tiny, tmp_path, monkeypatch):
  hf, cfg, params, texts = tiny
  first = grounding.item_embeddings(params, cfg, texts, tmp_path, batch_size=4)
  assert len(list(tmp_path.glob("*.npy"))) == 1
  monkeypatch.setattr(grounding, "embed_texts", lambda *a, **k: pytest.fail("the cache was not used"))
  np.testing.assert_array_equal(grounding.item_embeddings(params, cfg, texts, tmp_path, batch_size=4), first)
  other = dict(params, norm={"scale": params["norm"]["scale"] * 2})
  keys = {grounding.cache_key(p, cfg, t) for p, t in [(params, texts), (other, texts), (params, texts[1:])]}
  assert len(keys) == 3
