"""Shared test helpers: tiny random Hugging Face Llama models and their fellrec_jax twins."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole suite, its xdist workers and the runs it starts in
# subprocesses: many tests compile the same programs (the smoke runs' rounds, validation, evaluation), and
# on 2 CPU cores compiling is most of such a test's time. Entries are keyed by the program, the jax version
# and the devices, so a hit is the executable the test would have compiled. Every program is kept, however
# quick to compile: a run's ~100 small ones (initialisers, eager steps of its setup) take ~50 ms each to
# compile and ~10 ms to load (a smoke run in a fresh process: 25-31 s with only those over 0.1 s kept, 23 s).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np
import pytest

from fellrec_jax.model import hf_interop

# Tiny architectures covering what the parity tests must show (GQA, MQA, llama3 rope, tied embeddings).
TINY_CONFIGS = {
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "mha_bias": dict(num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    "llama3_rope": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "linear_rope": dict(num_attention_heads=4, num_key_value_heads=2,
                        rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def make_hf_model(seed=0, vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, **kwargs):
  """A random transformers LlamaForCausalLM in float32 eval mode."""
  import torch
  import transformers
  kwargs.setdefault("pad_token_id", 0)
  kwargs.setdefault("initializer_range", 0.1)  # larger than the default so attention is far from uniform
  config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                                    intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
                                    bos_token_id=1, eos_token_id=2, **kwargs)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # norms are 1 at init: randomise them so that a wrong norm cannot pass
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      if "bias" in name:
        p.copy_(0.05 * torch.randn_like(p))
  return model


def to_ours(hf_model, tmp_path, dtype="float32"):
  """(config, base params) of a transformers model, through a saved HF directory."""
  path = tmp_path / "hf"
  hf_model.save_pretrained(str(path))
  return hf_interop.load_llama(path, dtype=dtype)


def rel_error(ours, ref, mask=None):
  """Relative Frobenius error ||ours - ref|| / ||ref|| over the unmasked positions."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if mask is not None:
    ours, ref = ours[np.asarray(mask, bool)], ref[np.asarray(mask, bool)]
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def random_batch(vocab_size, batch=3, length=24, seed=0, padding="left"):
  """Random token ids and an attention mask with some padded rows."""
  rs = np.random.RandomState(seed)
  ids = rs.randint(3, vocab_size, (batch, length))
  mask = np.ones_like(ids)
  for row, pad in enumerate([0, 5, 11][:batch]):
    if pad:
      if padding == "left":
        mask[row, :pad] = 0
      else:
        mask[row, length - pad:] = 0
  ids[mask == 0] = 0
  return ids, mask


@pytest.fixture
def tiny(tmp_path):
  """A GQA tiny model: (hf_model, cfg, params)."""
  hf = make_hf_model(**TINY_CONFIGS["gqa"])
  cfg, params = to_ours(hf, tmp_path)
  return hf, cfg, params


def pytest_collection_modifyitems(items):
  """Tests marked slow first (in their order), then the rest: under pytest-xdist each worker takes the next
  test as it frees up, so the long runs start early and the workers end together instead of one of them
  finishing a long run alone (the end-to-end runs of test_train.py came last, alphabetically)."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
