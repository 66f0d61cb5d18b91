"""LoRA adapters: PEFT initialisation and numbers, gradients on adapters only, PEFT format round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from conftest import TINY_CONFIGS, make_hf_model, random_batch, rel_error, to_ours
from fellrec_jax.model import hf_interop
from fellrec_jax.model import lora
from fellrec_jax.model import llama as model

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def randomize(adapters, seed=0, scale=0.3):
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def peft_model(hf, lcfg, adapters):
  """PEFT model over `hf` with our adapter values copied into it."""
  config = peft.LoraConfig(r=lcfg.rank, lora_alpha=lcfg.alpha, lora_dropout=0.0, target_modules=list(lcfg.targets),
                           use_rslora=lcfg.use_rslora, task_type="CAUSAL_LM")
  pm = peft.get_peft_model(hf, config).eval()
  with torch.no_grad():
    for name, module in pm.named_modules():
      if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
        layer = int(name.split(".layers.")[1].split(".")[0])
        proj = name.rsplit(".", 1)[1]
        module.lora_A["default"].weight.copy_(torch.tensor(np.asarray(lora.projection_adapters(adapters)[proj]["lora_a"][layer]).T))
        module.lora_B["default"].weight.copy_(torch.tensor(np.asarray(lora.projection_adapters(adapters)[proj]["lora_b"][layer]).T))
  return pm


def logits_of(m, ids, mask):
  with torch.no_grad():
    return m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def test_fresh_adapters_follow_peft_init(tiny):
  _, cfg, _ = tiny
  lcfg = lora.LoraConfig(rank=4, targets=ALL)
  adapters = lora.init_adapters(cfg, lcfg, jax.random.PRNGKey(0))
  for name, (fan_in, fan_out) in lora.projection_shapes(cfg).items():
    ab = lora.projection_adapters(adapters)[name]
    a, b = np.asarray(ab["lora_a"]), np.asarray(ab["lora_b"])
    assert a.shape == (cfg.num_layers, fan_in, 4) and b.shape == (cfg.num_layers, 4, fan_out)
    assert np.all(b == 0)
    bound = 1 / np.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) of a [r, in] weight
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound


def test_zero_b_gives_the_base_logits_exactly(tiny):
  _, cfg, params = tiny
  lcfg = lora.LoraConfig(rank=4, targets=ALL, dropout=0.0)
  adapters = lora.init_adapters(cfg, lcfg, jax.random.PRNGKey(0))
  ids, mask = random_batch(cfg.vocab_size)
  inputs = model.plain_inputs(ids, mask)
  with_lora = model.forward(params, adapters, inputs, cfg, lcfg)
  without = model.forward(params, {}, inputs, cfg, lcfg)
  np.testing.assert_array_equal(np.asarray(with_lora), np.asarray(without))


@pytest.mark.parametrize("targets,rslora", [(("q_proj", "v_proj"), False), (ALL, False), (("k_proj", "down_proj"), True)])
def test_random_adapters_match_peft(targets, rslora, tmp_path):
  hf = make_hf_model(**TINY_CONFIGS["gqa"])
  cfg, params = to_ours(hf, tmp_path)
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=targets, use_rslora=rslora)
  adapters = randomize(lora.init_adapters(cfg, lcfg, jax.random.PRNGKey(1)))
  ids, mask = random_batch(cfg.vocab_size)
  ours = model.forward(params, adapters, model.plain_inputs(ids, mask), cfg, lcfg)
  base_only = model.forward(params, {}, model.plain_inputs(ids, mask), cfg, lcfg)
  ref = logits_of(peft_model(hf, lcfg, adapters), ids, mask)
  assert rel_error(base_only, ref, mask) > 1e-2  # the adapters matter
  assert rel_error(ours, ref, mask) <= 1e-5


def test_only_adapter_leaves_get_gradients(tiny):
  _, cfg, params = tiny
  lcfg = lora.LoraConfig(rank=4, dropout=0.0)
  adapters = randomize(lora.init_adapters(cfg, lcfg, jax.random.PRNGKey(0)))
  ids, mask = random_batch(cfg.vocab_size)
  inputs = model.plain_inputs(ids, mask)

  def loss(params, adapters):
    return jnp.mean(model.forward(params, adapters, inputs, cfg, lcfg) ** 2)

  base_grads, adapter_grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, adapters)  # not ~200 eager ops
  # Training differentiates the adapters alone; the base's gradient is never asked for.
  assert jax.tree.structure(adapter_grads) == jax.tree.structure(adapters)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(adapter_grads))
  trainable = lora.count_parameters(adapters)
  assert trainable == cfg.num_layers * 4 * (cfg.hidden_size + cfg.num_heads * cfg.head_dim) + \
      cfg.num_layers * 4 * (cfg.hidden_size + cfg.num_kv_heads * cfg.head_dim)


def test_dropout_is_inverted_and_random(tiny):
  _, cfg, params = tiny
  lcfg = lora.LoraConfig(rank=4, dropout=0.5)
  adapters = randomize(lora.init_adapters(cfg, lcfg, jax.random.PRNGKey(0)))
  x = jnp.ones((1000, cfg.hidden_size))
  adapter = jax.tree.map(lambda v: v[0], lora.projection_adapters(adapters)["q_proj"])
  no_base = {"kernel": jnp.zeros((cfg.hidden_size, cfg.num_heads * cfg.head_dim))}
  a = model.project(x, no_base, adapter, lcfg, jax.random.PRNGKey(1))
  b = model.project(x, no_base, adapter, lcfg, jax.random.PRNGKey(2))
  exact = model.project(x, no_base, adapter, lcfg, None)
  assert not np.allclose(a, b)
  np.testing.assert_allclose(np.mean(np.asarray(a), 0), np.asarray(exact)[0], rtol=0.2, atol=0.2 * np.abs(exact).max())


def test_our_adapter_loads_in_peft(tmp_path):
  hf = make_hf_model(**TINY_CONFIGS["mqa"])
  cfg, params = to_ours(hf, tmp_path)
  lcfg = lora.LoraConfig(rank=4, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj", "up_proj"))
  adapters = randomize(lora.init_adapters(cfg, lcfg, jax.random.PRNGKey(3)))
  hf_interop.save_peft_adapter(tmp_path / "adapter", adapters, lcfg)
  pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
  ids, mask = random_batch(cfg.vocab_size)
  ours = model.forward(params, adapters, model.plain_inputs(ids, mask), cfg, lora.LoraConfig(4, 16.0, 0.0, lcfg.targets))
  assert rel_error(ours, logits_of(pm, ids, mask), mask) <= 1e-5


def test_peft_adapter_loads_here_and_round_trips(tmp_path):
  hf = make_hf_model(**TINY_CONFIGS["gqa"])
  cfg, params = to_ours(hf, tmp_path)
  config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "o_proj"],
                           init_lora_weights=False, task_type="CAUSAL_LM")  # random A and B
  pm = peft.get_peft_model(hf, config).eval()
  pm.save_pretrained(str(tmp_path / "peft"))
  lcfg, adapters = hf_interop.load_peft_adapter(tmp_path / "peft", cfg)
  assert lcfg.rank == 4 and lcfg.alpha == 8 and lcfg.targets == ("o_proj", "q_proj")
  ids, mask = random_batch(cfg.vocab_size)
  ours = model.forward(params, adapters, model.plain_inputs(ids, mask), cfg, lcfg)
  assert rel_error(ours, logits_of(pm, ids, mask), mask) <= 1e-5
  hf_interop.save_peft_adapter(tmp_path / "again", adapters, lcfg)
  lcfg2, adapters2 = hf_interop.load_peft_adapter(tmp_path / "again", cfg)
  assert lcfg2 == lcfg
  jax.tree.map(np.testing.assert_array_equal, adapters, adapters2)


def test_bad_adapter_directories_are_named(tmp_path, tiny):
  _, cfg, _ = tiny
  with pytest.raises(hf_interop.CheckpointError, match="adapter_config.json"):
    hf_interop.load_peft_adapter(tmp_path, cfg)
  lcfg = lora.LoraConfig(rank=4)
  hf_interop.save_peft_adapter(tmp_path / "a", lora.init_adapters(cfg, lcfg, jax.random.PRNGKey(0)), lcfg)
  other = cfg.replace(hidden_size=cfg.hidden_size * 2)
  with pytest.raises(hf_interop.CheckpointError, match=r"lora_A.weight.*shape"):
    hf_interop.load_peft_adapter(tmp_path / "a", other)


def test_bad_lora_configs_are_rejected():
  with pytest.raises(ValueError, match="unknown LoRA target"):
    lora.LoraConfig(targets=("qkv",))
  with pytest.raises(ValueError, match="rank"):
    lora.LoraConfig(rank=0)
