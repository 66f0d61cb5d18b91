"""The tiny base model: title-list rows, pretraining lowers the loss, the cache is keyed by a fingerprint."""

import numpy as np
import pytest

from fellrec_jax.model import llama as model
from fellrec_jax.run import pretrain
from fellrec_jax.data import tokenizer
from fellrec_jax.data.records import parse_titles

TITLES = [f"Series {chr(65 + i % 7)} {1 + i // 7} - Platform {i % 3}" for i in range(21)]


@pytest.fixture(scope="module")
def bpe():
  return tokenizer.train_bpe_tokenizer([", ".join(f'"{t}"' for t in TITLES)] * 3, vocab_size=300)


def test_rows_list_random_titles_and_sorted_catalog_runs(bpe):
  rows = pretrain.title_rows(bpe, TITLES, rows=4, row_len=64, rng=np.random.default_rng(0))
  assert rows.shape == (4, 64) and (rows[:, 0] == bpe.bos_token_id).all()
  texts = [bpe.decode([t for t in row if t >= 0], skip_special_tokens=True) for row in rows]
  sorted_titles = sorted(TITLES)
  for text in texts[1::2]:  # odd rows: a run of the sorted catalog (the last title may be cut)
    titles = parse_titles(text[:text.rindex('", "') + 1])
    start = sorted_titles.index(titles[0])
    assert titles == [sorted_titles[(start + i) % len(TITLES)] for i in range(len(titles))]
  for text in texts[::2]:
    titles = parse_titles(text[:text.rindex('", "') + 1])
    assert set(titles) <= set(TITLES) and len(set(titles)) == len(titles)


def test_pretraining_learns_and_is_reused_by_fingerprint(bpe, tmp_path):
  cfg = model.LlamaConfig(vocab_size=len(bpe), hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                          num_kv_heads=1, head_dim=16, bos_token_id=bpe.bos_token_id, eos_token_id=bpe.eos_token_id)
  settings = dict(steps=30, rows=4, row_len=48, learning_rate=1e-2, seed=0)
  _, losses = pretrain.pretrain(cfg, bpe, TITLES, **settings)
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
  programs = pretrain._step._cache_size()
  _, again = pretrain.pretrain(cfg, bpe, TITLES, **settings)
  assert again == losses and pretrain._step._cache_size() == programs  # a second run traces nothing again
  out = tmp_path / "base"
  _, first = pretrain.load_or_pretrain(out, cfg, bpe, TITLES, **{**settings, "steps": 3})
  stamp = (out / "model.safetensors").stat().st_mtime_ns
  _, again = pretrain.load_or_pretrain(out, cfg, bpe, TITLES, **{**settings, "steps": 3})
  assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
  np.testing.assert_array_equal(first["embed_tokens"]["embedding"], again["embed_tokens"]["embedding"])
  pretrain.load_or_pretrain(out, cfg, bpe, TITLES, **{**settings, "steps": 4})
  assert (out / "model.safetensors").stat().st_mtime_ns != stamp  # other settings: pretrained again
