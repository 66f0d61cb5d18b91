"""Our HF save -> transformers from_pretrained -> the same logits; load errors name the file and tensor."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from conftest import TINY_CONFIGS, make_hf_model, random_batch, rel_error
from fellrec_jax.model import hf_interop
from fellrec_jax.model import lora
from fellrec_jax.model import llama as model

NO_LORA = lora.LoraConfig(dropout=0.0)


@pytest.mark.parametrize("name", ["gqa", "tied", "llama3_rope", "mha_bias"])
@pytest.mark.parametrize("shard", [None, 30_000])
def test_saved_directory_loads_in_transformers(name, shard, tmp_path):
  hf_kwargs = TINY_CONFIGS[name]
  cfg = hf_interop.config_from_hf(make_hf_model(**hf_kwargs).config)
  params = model.init_params(cfg.replace(initializer_range=0.1), jax.random.PRNGKey(0))
  params = jax.tree.map(lambda x: x + 0.05 * np.random.RandomState(1).randn(*x.shape).astype(np.float32), params)
  hf_interop.save_llama(tmp_path / "out", cfg, params, max_shard_bytes=shard)
  if shard:
    assert len(json.loads((tmp_path / "out/model.safetensors.index.json").read_text())["weight_map"]) > 0
  loaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True).eval()
  ids, mask = random_batch(cfg.vocab_size)
  with torch.no_grad():
    ref = loaded(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  ours = model.forward(params, {}, model.plain_inputs(ids, mask), cfg, NO_LORA)
  assert rel_error(ours, ref, mask) <= 1e-5
  cfg2, params2 = hf_interop.load_llama(tmp_path / "out")
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, jax.tree.map(np.asarray, params))


def test_load_errors_name_file_and_tensor(tmp_path):
  with pytest.raises(hf_interop.CheckpointError, match="config.json"):
    hf_interop.load_llama(tmp_path)
  hf = make_hf_model(**TINY_CONFIGS["gqa"])
  hf.save_pretrained(str(tmp_path / "ok"))
  cfg = hf_interop.load_config(tmp_path / "ok")
  with pytest.raises(hf_interop.CheckpointError, match="model.embed_tokens.weight.*shape"):
    hf_interop.load_params(tmp_path / "ok", cfg.replace(vocab_size=cfg.vocab_size + 1))
  (tmp_path / "ok/model.safetensors").unlink()
  with pytest.raises(hf_interop.CheckpointError, match="no model.safetensors"):
    hf_interop.load_params(tmp_path / "ok", cfg)
