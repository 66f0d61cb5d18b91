"""The split of docs/method.md §3: front∘middle∘back equals the full forward, for values and adapter gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_batch
from fellrec_jax.model import lora
from fellrec_jax.model import llama as model
from test_lora import randomize

LCFG = lora.LoraConfig(rank=4, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))


def split_logits(params, adapters, inputs, cfg, k):
  h_k = model.front(params, adapters, inputs, cfg, LCFG, k)
  h_last = model.middle(params, adapters, h_k, inputs, cfg, LCFG, k)
  return model.back(params, adapters, h_last, inputs, cfg, LCFG)


@pytest.fixture
def four_layers():
  cfg = model.LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4,
                          num_kv_heads=2, head_dim=8, initializer_range=0.1)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  adapters = randomize(lora.init_adapters(cfg, LCFG, jax.random.PRNGKey(1)), scale=0.2)
  return cfg, params, adapters


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_split_forward_equals_full_forward(four_layers, k):
  cfg, params, adapters = four_layers
  ids, mask = random_batch(cfg.vocab_size)
  inputs = model.plain_inputs(ids, mask)
  full = model.forward(params, adapters, inputs, cfg, LCFG)
  np.testing.assert_allclose(split_logits(params, adapters, inputs, cfg, k), full, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [0, 2, 3])
def test_split_adapter_gradients_equal_unsplit(four_layers, k):
  cfg, params, adapters = four_layers
  ids, mask = random_batch(cfg.vocab_size)
  inputs = model.plain_inputs(ids, mask)
  target = jax.random.normal(jax.random.PRNGKey(2), (*ids.shape, cfg.vocab_size))
  loss = lambda logits: jnp.sum(jnp.where(mask[..., None] > 0, (logits - target) ** 2, 0.0))
  full = jax.grad(lambda a: loss(model.forward(params, a, inputs, cfg, LCFG)))(adapters)
  split = jax.grad(lambda a: loss(split_logits(params, a, inputs, cfg, k)))(adapters)
  for g_full, g_split in zip(jax.tree.leaves(full), jax.tree.leaves(split)):
    np.testing.assert_allclose(g_split, g_full, rtol=1e-5, atol=1e-6 * float(jnp.abs(g_full).max()))


def test_each_part_touches_only_its_layers(four_layers):
  """front uses layers [0, k), middle [k, L-1), back L-1: the gradients of each part's adapters say so."""
  cfg, params, adapters = four_layers
  k = 2
  ids, mask = random_batch(cfg.vocab_size)
  inputs = model.plain_inputs(ids, mask)
  h_k = model.front(params, adapters, inputs, cfg, LCFG, k)
  parts = {
      "front": (lambda a: jnp.sum(model.front(params, a, inputs, cfg, LCFG, k).rows ** 2), {0, 1}),
      "middle": (lambda a: jnp.sum(model.middle(params, a, h_k, inputs, cfg, LCFG, k).rows ** 2), {2}),
      "back": (lambda a: jnp.sum(model.back(params, a, h_k, inputs, cfg, LCFG) ** 2), {3}),
  }
  for name, (fn, layers) in parts.items():
    grads = jax.grad(fn)(adapters)
    touched = {l for l in range(cfg.num_layers) if float(jnp.abs(grads["layers"]["self_attn"]["q_proj"]["lora_b"][l]).max()) > 0}
    assert touched == layers, name
