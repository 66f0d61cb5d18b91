"""The Flax/JAX Llama computes what transformers' LlamaForCausalLM computes (float32, <= 1e-5 relative)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIGS, make_hf_model, random_batch, rel_error, to_ours
from fellrec_jax.model import lora
from fellrec_jax.model import llama as model
from fellrec_jax.model import split

ROOT = Path(__file__).resolve().parents[1]
NO_LORA = lora.LoraConfig(dropout=0.0)
TOL = 1e-5


def hf_logits(hf, ids, mask, positions=None):
  with torch.no_grad():
    kwargs = {} if positions is None else {"position_ids": torch.tensor(positions)}
    return hf(torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs).logits.float().numpy()


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("padding", ["left", "right"])
def test_logits_match_transformers(name, padding, tmp_path):
  hf = make_hf_model(**TINY_CONFIGS[name])
  cfg, params = to_ours(hf, tmp_path)
  ids, mask = random_batch(cfg.vocab_size, padding=padding)
  ours = model.forward(params, {}, model.plain_inputs(ids, mask), cfg, NO_LORA)
  assert rel_error(ours, hf_logits(hf, ids, mask), mask) <= TOL


def test_positions_from_mask_match_transformers(tiny):
  """With left padding, generate-style positions (cumsum(mask) - 1) also match."""
  hf, cfg, params = tiny
  ids, mask = random_batch(cfg.vocab_size)
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  ours = model.forward(params, {}, model.plain_inputs(ids, mask, positions), cfg, NO_LORA)
  assert rel_error(ours, hf_logits(hf, ids, mask, positions), mask) <= TOL


def test_a_wrong_rope_theta_is_detected(tiny):
  """The parity bar is tight enough to catch a small architectural error."""
  hf, cfg, params = tiny
  ids, mask = random_batch(cfg.vocab_size)
  wrong = cfg.replace(rope_theta=cfg.rope_theta * 1.5)
  ours = model.forward(params, {}, model.plain_inputs(ids, mask), wrong, NO_LORA)
  assert rel_error(ours, hf_logits(hf, ids, mask), mask) > 1e-3


def test_logits_are_causal(tiny):
  """Changing a later token changes no earlier logit."""
  _, cfg, params = tiny
  ids, mask = random_batch(cfg.vocab_size, padding="right")
  changed = ids.copy()
  changed[:, 10] = (changed[:, 10] + 1) % cfg.vocab_size
  a = model.forward(params, {}, model.plain_inputs(ids, mask), cfg, NO_LORA)
  b = model.forward(params, {}, model.plain_inputs(changed, mask), cfg, NO_LORA)
  np.testing.assert_array_equal(np.asarray(a)[:, :10], np.asarray(b)[:, :10])
  assert np.abs(np.asarray(a)[0, 10:] - np.asarray(b)[0, 10:]).max() > 0


def test_bfloat16_compute_is_close(tiny):
  hf, cfg, params = tiny
  ids, mask = random_batch(cfg.vocab_size)
  ours = model.forward(params, {}, model.plain_inputs(ids, mask), cfg.replace(dtype="bfloat16"), NO_LORA)
  assert ours.dtype == np.float32
  assert rel_error(ours, hf_logits(hf, ids, mask), mask) <= 3e-2


def test_hf_logits_tool(tmp_path):
  """tools/hf_logits.py on a saved (sharded) HF directory writes the same logits as transformers."""
  hf = make_hf_model(**TINY_CONFIGS["llama3_rope"])
  hf_dir = tmp_path / "ckpt"
  hf.save_pretrained(str(hf_dir), max_shard_size="40KB")
  assert (hf_dir / "model.safetensors.index.json").exists()
  ids, mask = random_batch(hf.config.vocab_size)
  np.save(tmp_path / "ids.npy", ids)
  np.save(tmp_path / "mask.npy", mask)
  out = tmp_path / "logits.npy"
  subprocess.run([sys.executable, str(ROOT / "tools/hf_logits.py"), "--hf_dir", str(hf_dir), "--input_ids",
                  str(tmp_path / "ids.npy"), "--attention_mask", str(tmp_path / "mask.npy"), "--out", str(out)],
                 check=True, cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
  logits = np.load(out)
  assert logits.dtype == np.float32 and logits.shape == (*ids.shape, hf.config.vocab_size)
  assert rel_error(logits, hf_logits(hf, ids, mask), mask) <= TOL


def test_split_point_must_leave_the_last_layer_on_the_client(tiny):
  _, cfg, _ = tiny
  split.check_split(cfg, 0)
  split.check_split(cfg, cfg.num_layers - 1)
  with pytest.raises(ValueError, match="split_k=3 is impossible"):
    split.check_split(cfg, cfg.num_layers)
