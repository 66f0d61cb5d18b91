"""Client cost vs k (fellrec_jax/analysis/client_cost.py) against hand counts, flops.py and the split step."""

import functools
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fellrec_jax.analysis import client_cost
from fellrec_jax.analysis import flops
from fellrec_jax.model import lora
from fellrec_jax.model import llama as model
from fellrec_jax.federated import split_learning

# tools/client_cost.py's tiny preset.
CFG = model.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                        num_kv_heads=2, head_dim=16)
LCFG = lora.LoraConfig(rank=8, targets=("q_proj", "v_proj"))
B, T, N = 2, 8, 12  # batch of the compiled step; tokens per sample of FLOPs and boundary bytes
# q 64x64, k and v 64x32, o 64x64, gate and up 64x128, down 128x64, plus two norms of 64.
LAYER = 4096 + 2048 + 2048 + 4096 + 3 * 8192 + 2 * 64
LORA_LAYER = 8 * (64 + 64) + 8 * (64 + 32)  # q and v: r x (in + out)
EMBED = 256 * 64


@pytest.fixture(scope="module")
def rows():
  return client_cost.cost_table(CFG, LCFG, B, T, tokens_per_sample=N)


def test_parameters_equal_hand_counts_and_the_compiled_pytree(rows):
  assert [r["k"] for r in rows] == [1, 2, 3]
  for r in rows:
    k = r["k"]
    assert r["client_base_params"] == 2 * EMBED + 64 + (k + 1) * LAYER  # embed, head, norm, k+1 layers
    assert r["client_lora_params"] == (k + 1) * LORA_LAYER
    assert r["server_base_params"] == (3 - k) * LAYER and r["server_lora_params"] == (3 - k) * LORA_LAYER
    assert flops.client_parameters(CFG, LCFG, k) == {"base": r["client_base_params"],
                                                     "lora": r["client_lora_params"]}
    base, adapters = client_cost.client_abstract_state(CFG, LCFG, k, jnp.float32)
    assert sum(x.size for x in jax.tree.leaves(base)) == r["client_base_params"]
    assert sum(x.size for x in jax.tree.leaves(adapters)) == r["client_lora_params"]


def test_bytes_are_counts_times_itemsizes(rows):
  for r in rows:
    assert r["client_base_bytes"] == 4 * r["client_base_params"]  # float32 base
    assert r["client_lora_state_bytes"] == 4 * 4 * r["client_lora_params"]  # LoRA, 2 moments, grads in f32
    assert r["client_held_bytes"] == r["client_base_bytes"] + r["client_lora_state_bytes"]
  held = client_cost.held_bytes(CFG, LCFG, 1, param_dtype="bfloat16")
  assert held["base"] == 2 * rows[0]["client_base_params"]
  assert held["lora_state"] == rows[0]["client_lora_state_bytes"]


def test_flops_are_flops_client_training_flops(rows):
  for r in rows:
    assert r["client_flops_per_sample"] == flops.client_training_flops(CFG, LCFG, N, r["k"])
    assert r["client_flops_per_sample"] + r["server_flops_per_sample"] == flops.training_flops(CFG, LCFG, N)
    assert r["client_flops_share"] == pytest.approx(r["client_flops_per_sample"] / r["total_flops_per_sample"])
  assert rows[-1]["client_flops_share"] == 1.0


def test_the_client_grows_with_k_and_the_server_shrinks(rows):
  for name in ("client_params", "client_held_bytes", "client_flops_per_sample", "client_peak_bytes"):
    values = [r[name] for r in rows]
    assert all(a < b for a, b in zip(values, values[1:])), (name, values)
  for name in ("server_base_params", "server_flops_per_sample"):
    values = [r[name] for r in rows]
    assert all(a > b for a, b in zip(values, values[1:])), (name, values)
  assert rows[-1]["server_base_params"] == rows[-1]["server_flops_per_sample"] == 0


def test_boundary_bytes_per_sample(rows):
  assert [r["boundary_bytes_per_sample"] for r in rows] == [4 * N * 64 * 4] * 2 + [0]  # none at k = L-1
  bf16 = CFG.replace(dtype="bfloat16")
  assert client_cost.boundary_bytes_per_sample(bf16, LCFG, 1, N) == 4 * N * 64 * 2


def test_compiled_memory_counts_the_client_arguments(rows):
  for r in rows:
    batch = 3 * B * T * 4 + B * T * 4  # tokens, positions, segment ids (int32) and the loss mask
    received = 2 * B * T * 64 * 4 if r["k"] < 3 else 0  # h_{L-1} and dL/dh_k, none without a server
    assert r["client_argument_bytes"] == r["client_base_bytes"] + 4 * r["client_lora_params"] + batch + received
    assert r["client_peak_bytes"] >= r["client_argument_bytes"] + r["client_output_bytes"]
    assert r["client_temp_bytes"] > 0


def test_client_step_matches_the_split_step():
  """The measured function is the client's real work: its outputs and gradients are those of the split."""
  k, L = 1, CFG.num_layers
  base = model.init_params(CFG, jax.random.key(0))
  adapters = lora.init_adapters(CFG, LCFG, jax.random.key(1))
  adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapters)
  inputs = model.plain_inputs(jax.random.randint(jax.random.key(3), (B, T), 3, CFG.vocab_size))
  loss_mask = jnp.ones((B, T)).at[:, 0].set(0)
  client_layers = jnp.array(list(range(k)) + [L - 1])
  take = lambda tree: jax.tree.map(lambda x: x[client_layers], tree)
  client_base = {**base, "layers": take(base["layers"])}
  step = jax.jit(functools.partial(client_cost.client_step, cfg=CFG, lcfg=LCFG, k=k))

  @jax.jit
  def split_reference():
    sc = split_learning.SplitConfig(CFG, LCFG, k)
    total, _, grads = split_learning.loss_and_grads(base, adapters, inputs, loss_mask, jnp.zeros((0,)), sc)
    h_k = model.front(base, adapters, inputs, CFG, LCFG, k)
    h_last, middle_vjp = jax.vjp(lambda h: model.middle(base, adapters, h, inputs, CFG, LCFG, k), h_k)
    zeros = jax.tree.map(jnp.zeros_like, h_k)  # dL/dh_{L-1} does not depend on dL/dh_k
    _, dh_last, _, _ = step(client_base, take(adapters), inputs, loss_mask, h_last, zeros)
    return total, take(grads), h_k, h_last, middle_vjp(dh_last)[0]

  total, grads, h_k, h_last, dh_k = split_reference()
  sent_h_k, _, client_total, client_grads = step(client_base, take(adapters), inputs, loss_mask, h_last, dh_k)
  np.testing.assert_allclose(sent_h_k.rows, h_k.rows, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(client_total, total, rtol=1e-5)
  for ours, ref in zip(jax.tree.leaves(client_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7)


def test_cli_writes_the_table_the_json_and_the_plot(tmp_path):
  spec = importlib.util.spec_from_file_location(
      "client_cost_tool", Path(__file__).resolve().parents[1] / "tools/client_cost.py")
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  rows = tool.main(["--preset", "tiny", "--batch_size", "2", "--seq_len", "8", "--ks", "1,3",
                    "--out_dir", str(tmp_path)])
  assert [r["k"] for r in rows] == [1, 3]
  report = json.loads((tmp_path / "client_cost.json").read_text())
  assert report["rows"] == rows and report["model"]["num_layers"] == 4
  assert "| k | client layers |" in (tmp_path / "client_cost.md").read_text()
  assert (tmp_path / "client_cost.png").read_bytes()[:4] == b"\x89PNG"
