"""FLOP and parameter counts against hand computations on a tiny config."""

from fellrec_jax.analysis import flops
from fellrec_jax.model import lora
from fellrec_jax.model import llama as model

CFG = model.LlamaConfig(vocab_size=10, hidden_size=4, intermediate_size=6, num_layers=3, num_heads=2,
                        num_kv_heads=1, head_dim=2)
LCFG = lora.LoraConfig(rank=1, targets=("q_proj", "v_proj"))


def test_layer_and_training_flops_by_hand():
  n = 5
  # q 4x4, k 4x2, v 4x2, o 4x4, gate/up 4x6, down 6x4: 16+8+8+16+24+24+24 = 120 multiply-adds per token.
  assert flops.layer_flops(CFG, LCFG, n).frozen == 2 * n * 120
  assert flops.layer_flops(CFG, LCFG, n).attention == 4 * n * n * 2 * 2  # QK^T and PV, causal not halved
  assert flops.layer_flops(CFG, LCFG, n).lora == 2 * n * ((4 + 4) + (4 + 2))  # q: 4x1 + 1x4, v: 4x1 + 1x2
  per_layer = 2 * (2 * n * 120) + 3 * (4 * n * n * 4) + 3 * (2 * n * 14)
  head = 2 * n * 4 * 10
  assert flops.training_flops(CFG, LCFG, n) == 3 * per_layer + 2 * head
  assert flops.forward_flops(CFG, LCFG, n) == 3 * (2 * n * 120 + 4 * n * n * 4 + 2 * n * 14) + head
  assert flops.client_training_flops(CFG, LCFG, n, k=1) == 2 * per_layer + 2 * head  # layers 0 and L-1


def test_parameters_by_hand():
  counts = flops.base_parameter_counts(CFG)
  assert counts == {"embed": 40, "layer": 120 + 8, "norm": 4, "head": 40}
  assert flops.total_parameters(CFG) == 40 + 3 * 128 + 4 + 40
  assert flops.client_parameters(CFG, LCFG, k=1) == {"base": 40 + 2 * 128 + 4 + 40, "lora": 2 * 14}
  tied = CFG.replace(tie_word_embeddings=True)
  assert flops.base_parameter_counts(tied)["head"] == 0


def test_executed_layouts_reduce_to_the_plain_count():
  """One row holding one example of T tokens, no prefix: the packed and streamed counts are the plain one."""
  T = 6
  plain = flops.training_flops(CFG, LCFG, T)
  assert flops.packed_training_flops(CFG, LCFG, rows=1, row_len=T, prefix_len=0) == plain
  assert flops.streamed_training_flops(CFG, LCFG, tokens=T, rows=1, row_len=T, prefix_len=0, clients=1) == plain
  # Two causal blocks skip a quarter of the row's [T, T] scores.
  halved = flops.streamed_training_flops(CFG, LCFG, tokens=T, rows=1, row_len=T, prefix_len=0, clients=1,
                                         causal_blocks=2)
  assert plain - halved == 3 * 3 * 4 * (3 * 3) * 2 * 2
