"""The Flax NNX model: its split states are the pytrees training runs on; HF in and out; new adapter targets."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from conftest import TINY_CONFIGS, make_hf_model, random_batch, rel_error
from fellrec_jax.federated import split_learning
from fellrec_jax.federated import stream
from fellrec_jax.model import hf_interop
from fellrec_jax.model import llama
from fellrec_jax.model import lora

LCFG = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0)


@pytest.fixture
def hf_dir(tmp_path):
  hf = make_hf_model(**TINY_CONFIGS["gqa"])
  hf.save_pretrained(str(tmp_path / "hf"))
  return hf, tmp_path / "hf"


def randomized(tree, seed=1, scale=0.2):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_split_of_a_loaded_model_gives_the_states_training_uses(hf_dir):
  _, path = hf_dir
  key = jax.random.key(3)
  model = hf_interop.load_model(path, LCFG, key)
  _, adapter_state, base_state = nnx.split(model, llama.Adapter, ...)
  base, adapters = nnx.to_pure_dict(base_state), nnx.to_pure_dict(adapter_state)
  # What a run loads (run/setup.load_base) and what every client starts from (run/state.init_state).
  cfg, run_base = hf_interop.load_llama(path)
  run_adapters = lora.init_adapters(cfg, LCFG, key)
  assert jax.tree.structure(base) == jax.tree.structure(run_base)
  assert jax.tree.structure(adapters) == jax.tree.structure(run_adapters)
  jax.tree.map(np.testing.assert_array_equal, base, run_base)
  jax.tree.map(np.testing.assert_array_equal, adapters, run_adapters)
  # Only adapters are Adapter variables; every projection kernel is in the base.
  assert all(leaf.shape[-1] == LCFG.rank or leaf.shape[-2] == LCFG.rank for leaf in jax.tree.leaves(adapters))
  assert len(jax.tree.leaves(base["layers"]["self_attn"])) == 4 and len(jax.tree.leaves(base["layers"]["mlp"])) == 3
  # The split states train: gradients come back in the adapter state's structure, nonzero.
  ids, mask = random_batch(cfg.vocab_size)
  inputs = llama.plain_inputs(ids, mask)
  sc = split_learning.SplitConfig(cfg, LCFG, 1)
  _, _, grads = split_learning.loss_and_grads(base, randomized(adapters), inputs, jnp.asarray(mask, jnp.float32),
                                              jnp.zeros((0,)), sc)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_module_calls_run_the_same_functions(hf_dir):
  _, path = hf_dir
  model = hf_interop.load_model(path, LCFG)
  base, adapters = llama.states(model)
  adapters = randomized(adapters)
  model = llama.merge(model.config, LCFG, base, adapters)
  ids, mask = random_batch(model.config.vocab_size)
  inputs = llama.plain_inputs(ids, mask)
  np.testing.assert_array_equal(model(inputs), llama.forward(base, adapters, inputs, model.config, LCFG))
  # One layer as its own module: the slice of the stacked state, and the packed layer's numbers.
  layer = model.layer(1)
  jax.tree.map(np.testing.assert_array_equal, llama.states(layer)[0], llama.take_layer(base["layers"], 1))
  x = jax.random.normal(jax.random.key(0), (7, model.config.hidden_size))
  ctx = llama.context(llama.plain_inputs(np.zeros((1, 7), np.int32)), model.config)
  packed = llama.packed_layer(llama.Activations(x[None], jnp.zeros((0, x.shape[1]))),
                              llama.take_layer(base["layers"], 1), llama.take_layer(adapters["layers"], 1), ctx,
                              model.config, LCFG)
  np.testing.assert_allclose(layer(x, jnp.arange(7)), packed.rows[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["gqa", "tied", "mha_bias"])
def test_model_from_hf_saved_back_reloads_in_transformers(name, tmp_path):
  hf = make_hf_model(**TINY_CONFIGS[name])
  hf.save_pretrained(str(tmp_path / "in"))
  model = hf_interop.load_model(tmp_path / "in", LCFG)
  hf_interop.save_model(tmp_path / "out", model)
  again = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True).eval()
  ids, mask = random_batch(model.config.vocab_size)
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    reloaded = again(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_array_equal(reloaded, ref)  # the same tensors, so the same numbers
  # Fresh adapters (lora_b = 0) leave the base unchanged: the module's logits are transformers'.
  assert rel_error(model(llama.plain_inputs(ids, mask)), ref, mask) <= 1e-5


def test_new_adapter_targets_need_nothing_outside_the_model_package(hf_dir):
  """LoRA on k_proj and gate_proj only: PEFT parity, split == unsplit, streamed == one by one."""
  hf, path = hf_dir
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("k_proj", "gate_proj"))
  model = hf_interop.load_model(path, lcfg)
  base, adapters = llama.states(model)
  assert set(lora.projection_adapters(adapters)) == {"k_proj", "gate_proj"}
  adapters = randomized(adapters, scale=0.3)
  cfg = model.config
  ids, mask = random_batch(cfg.vocab_size, padding="right")  # the stream's examples start at position 0
  pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0,
                                               target_modules=["k_proj", "gate_proj"], task_type="CAUSAL_LM")).eval()
  with torch.no_grad():
    for module_name, module in pm.named_modules():
      if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
        layer = int(module_name.split(".layers.")[1].split(".")[0])
        ab = lora.projection_adapters(adapters)[module_name.rsplit(".", 1)[1]]
        module.lora_A["default"].weight.copy_(torch.tensor(np.asarray(ab["lora_a"][layer]).T))
        module.lora_B["default"].weight.copy_(torch.tensor(np.asarray(ab["lora_b"][layer]).T))
    ref = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  inputs = llama.plain_inputs(ids, mask)
  assert rel_error(llama.merge(cfg, lcfg, base, adapters)(inputs), ref, mask) <= 1e-5

  loss_mask = jnp.asarray(mask, jnp.float32).at[:, 0].set(0)
  no_prefix = jnp.zeros((0,))
  unsplit = jax.grad(lambda a: split_learning.loss_only(base, a, inputs, loss_mask, no_prefix,
                                                        split_learning.SplitConfig(cfg, lcfg, 1))[0])(adapters)
  for k in range(cfg.num_layers):  # every split point, i.e. every client/server layer range
    sc = split_learning.SplitConfig(cfg, lcfg, k)
    _, _, grads = split_learning.loss_and_grads(base, adapters, inputs, loss_mask, no_prefix, sc)
    for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(unsplit)):
      np.testing.assert_allclose(g, u, rtol=1e-4, atol=1e-6 * float(jnp.abs(u).max()))

  # Two clients in one stream equal each client alone.
  sc = split_learning.SplitConfig(cfg, lcfg, 1)
  two = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x]), adapters)
  rows = lambda t: jnp.stack([jnp.asarray(t), jnp.asarray(t)])
  segment_ids = jnp.asarray(mask, jnp.int32)
  batch = (rows(ids), rows(inputs.positions), rows(segment_ids), rows(loss_mask))
  budget = stream.budgets(np.asarray(batch[2])[:, None], np.ones((2, 1), bool))
  totals, _, grads = stream.loss_and_grads(base, two, batch, jnp.ones(2, bool), jnp.zeros((0,), jnp.int32),
                                           no_prefix, sc, budget)
  for c in range(2):
    one = jax.tree.map(lambda x: x[c], two)
    total, _, g_one = split_learning.loss_and_grads(base, one, inputs, loss_mask, no_prefix, sc)
    np.testing.assert_allclose(totals[c], total, rtol=1e-5)
    for g, u in zip(jax.tree.leaves(jax.tree.map(lambda x: x[c], grads)), jax.tree.leaves(g_one)):
      np.testing.assert_allclose(g, u, rtol=1e-4, atol=1e-6 * float(jnp.abs(u).max()))
