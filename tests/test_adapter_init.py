"""fed.adapter_init: each client its own lora_a (the reference's fresh PEFT model per client) or one shared."""

import types

import jax
import ml_collections
import numpy as np

from fellrec_jax.model import llama
from fellrec_jax.model import lora
from fellrec_jax.run import state as state_lib
from fellrec_jax.run import train
from test_train import metrics, smoke

CFG = llama.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=2,
                        num_kv_heads=1, head_dim=8)
LCFG = lora.LoraConfig(rank=2, targets=("q_proj", "v_proj"))


def fake_run(adapter_init):
  config = ml_collections.ConfigDict({"fed": {"adapter_init": adapter_init}})
  return types.SimpleNamespace(config=config, model_cfg=CFG, lcfg=LCFG)


def test_per_client_init_draws_each_client_from_its_own_key():
  key = jax.random.key(7)
  stacked = state_lib.initial_adapters(fake_run("per_client"), key, 4)
  a = [lora.projection_adapters(stacked)[name]["lora_a"] for name in LCFG.targets]
  for c in range(4):
    own = lora.init_adapters(CFG, LCFG, jax.random.fold_in(key, c))  # the documented key of client c
    for name, a_c in zip(LCFG.targets, a):
      np.testing.assert_array_equal(a_c[c], lora.projection_adapters(own)[name]["lora_a"])
  assert all(not np.allclose(x[0], x[1]) for x in a)
  assert all(np.all(ab["lora_b"] == 0) for ab in lora.projection_adapters(stacked).values())


def test_shared_init_gives_every_client_the_same_draw():
  key = jax.random.key(7)
  stacked = state_lib.initial_adapters(fake_run("shared"), key, 3)
  one = lora.init_adapters(CFG, LCFG, key)
  for leaf, ref in zip(jax.tree.leaves(stacked), jax.tree.leaves(one)):
    for c in range(3):
      np.testing.assert_array_equal(leaf[c], ref)


def test_per_client_init_lowers_the_round_0_similarity(tmp_path):
  """After round 0 the clients' adapters are still mostly their initial lora_a: shared ones look alike
  (similarity near 1), independent ones do not."""
  sims = {}
  for init in ("shared", "per_client"):
    train.train(smoke(**{"fed.rounds": 1, "fed.adapter_init": init, "eval.at_end": False}), tmp_path / init)
    sims[init] = metrics(tmp_path / init)[0]["similarity_offdiag_mean"]
  assert sims["shared"] > 0.99
  assert sims["per_client"] < sims["shared"] - 0.1, sims
