"""The packed loss with a shared prefix equals the plain per-example loss, in value and adapter gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fellrec_jax.model import lora
from fellrec_jax.model import llama as model
from fellrec_jax.model import loss as loss_lib
from test_lora import randomize

LCFG = lora.LoraConfig(rank=4, dropout=0.0, targets=("q_proj", "v_proj", "up_proj"))


@pytest.fixture(scope="module")
def setup():
  cfg = model.LlamaConfig(vocab_size=41, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                          num_kv_heads=2, head_dim=8, initializer_range=0.1)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  adapters = randomize(lora.init_adapters(cfg, LCFG, jax.random.PRNGKey(1)), scale=0.2)
  rs = np.random.RandomState(0)
  prefix = rs.randint(3, 41, 7)
  suffixes = [rs.randint(3, 41, n) for n in (5, 9, 3, 6, 8)]
  # Label masks: prefix tokens 1.. are labels; in each suffix, all but a random first part (response-only style).
  prefix_mask = np.r_[0.0, rs.randint(0, 2, 6).astype(float)]
  suffix_masks = [(np.arange(len(s)) >= rs.randint(0, len(s))).astype(float) for s in suffixes]
  return cfg, params, adapters, prefix, prefix_mask, suffixes, suffix_masks


def plain_loss(adapters, cfg, params, prefix, prefix_mask, suffixes, suffix_masks):
  """Every example as its own right-padded row [prefix + suffix], labels shifted as in transformers."""
  T = len(prefix) + max(map(len, suffixes))
  ids = np.zeros((len(suffixes), T), np.int32)
  labels = np.zeros((len(suffixes), T), np.float32)
  attn = np.zeros((len(suffixes), T), np.int32)
  for i, (s, m) in enumerate(zip(suffixes, suffix_masks)):
    n = len(prefix) + len(s)
    ids[i, :n], labels[i, :n], attn[i, :n] = np.r_[prefix, s], np.r_[prefix_mask, m], 1
  logits = model.forward(params, adapters, model.plain_inputs(ids, attn), cfg, LCFG)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(nll * labels[:, 1:]), labels[:, 1:].sum()


def packed_inputs(prefix, prefix_mask, suffixes, suffix_masks, rows, T, share):
  """Pack suffixes into rows (rows: list of example indices per row); share=False puts the prefix in rows."""
  P = len(prefix)
  tokens, positions, segments, labels = (np.zeros((len(rows), T), np.int32) for _ in range(4))
  for r, members in enumerate(rows):
    offset = 0
    for seg, i in enumerate(members, 1):
      toks = suffixes[i] if share else np.r_[prefix, suffixes[i]]
      mask = suffix_masks[i] if share else np.r_[prefix_mask, suffix_masks[i]]
      pos = np.arange(P, P + len(toks)) if share else np.arange(len(toks))
      sl = slice(offset, offset + len(toks))
      tokens[r, sl], positions[r, sl], segments[r, sl], labels[r, sl] = toks, pos, seg, mask
      offset += len(toks)
  prefix_tokens = prefix if share else np.zeros((0,), np.int32)
  inputs = model.Inputs(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments),
                        jnp.asarray(prefix_tokens, jnp.int32))
  return inputs, labels.astype(np.float32), (prefix_mask if share else np.zeros((0,)))


def packed_loss(adapters, cfg, params, inputs, labels, prefix_mask, chunk=0):
  h = model.forward_hidden(params, adapters, inputs, cfg, LCFG)
  return loss_lib.packed_nll(params, h, inputs, labels, jnp.asarray(prefix_mask, jnp.float32), cfg, chunk)


def loss_and_grad(loss_fn, adapters):
  """(sum, count, the adapters' gradient of sum / count) of loss_fn(adapters) -> (sum, count), as one
  compiled program (op by op, the first test spent ~20 s compiling each primitive)."""
  def mean(a):
    total, count = loss_fn(a)
    return total / count, (total, count)
  (_, (total, count)), grad = jax.jit(jax.value_and_grad(mean, has_aux=True))(adapters)
  return total, count, grad


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("chunk", [0, 16])
def test_packed_loss_and_gradients_equal_plain(setup, share, chunk):
  cfg, params, adapters, prefix, prefix_mask, suffixes, suffix_masks = setup
  rows = [[1, 2], [4, 0], [3]]
  T = 24 if share else 32
  inputs, labels, pmask = packed_inputs(prefix, prefix_mask, suffixes, suffix_masks, rows, T, share)
  ref_sum, ref_count, g_ref = loss_and_grad(
      lambda a: plain_loss(a, cfg, params, prefix, prefix_mask, suffixes, suffix_masks), adapters)
  got_sum, got_count, g_got = loss_and_grad(lambda a: packed_loss(a, cfg, params, inputs, labels, pmask, chunk),
                                            adapters)
  assert float(got_count) == float(ref_count)
  np.testing.assert_allclose(got_sum, ref_sum, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6 * float(jnp.abs(b).max()))


def test_packing_order_does_not_matter(setup):
  cfg, params, adapters, prefix, prefix_mask, suffixes, suffix_masks = setup
  loss = jax.jit(packed_loss, static_argnums=1)
  a = loss(adapters, cfg, params, *packed_inputs(prefix, prefix_mask, suffixes, suffix_masks, [[0, 1], [2, 3, 4]],
                                                 20, True))
  b = loss(adapters, cfg, params, *packed_inputs(prefix, prefix_mask, suffixes, suffix_masks,
                                                 [[4], [3, 1], [0, 2], []], 24, True))
  np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
  assert float(a[1]) == float(b[1])


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [0, 7])
def test_fused_head_and_cross_entropy_equal_the_plain_ones(tied, chunk):
  """weighted_nll (logits per chunk, gradient formed in the forward pass) = sum(weights * token_nll), in value
  and in gradients with respect to the hidden states, the head (pretraining differentiates it) and the weights."""
  cfg = model.LlamaConfig(vocab_size=41, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                          num_kv_heads=1, head_dim=8, tie_word_embeddings=tied, initializer_range=0.3)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  rs = np.random.RandomState(1)
  h = jnp.asarray(rs.randn(23, 16), jnp.float32)
  targets = jnp.asarray(rs.randint(0, 41, 23))
  weights = jnp.asarray(rs.randint(0, 3, 23), jnp.float32)
  plain = lambda p, h, w: jnp.sum(w * loss_lib.token_nll(p, h, targets, cfg))
  fused = lambda p, h, w: loss_lib.weighted_nll(p, h, targets, w, cfg, chunk)
  np.testing.assert_allclose(fused(params, h, weights), plain(params, h, weights), rtol=1e-6)
  got = jax.grad(fused, argnums=(0, 1, 2))(params, h, weights)
  want = jax.grad(plain, argnums=(0, 1, 2))(params, h, weights)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))


def test_fused_per_token_nll_takes_any_cotangent():
  cfg = model.LlamaConfig(vocab_size=41, hidden_size=16, intermediate_size=24, num_layers=1, num_heads=2,
                          num_kv_heads=1, head_dim=8, initializer_range=0.3)
  params = model.init_params(cfg, jax.random.PRNGKey(0))
  rs = np.random.RandomState(2)
  h, targets = jnp.asarray(rs.randn(11, 16), jnp.float32), jnp.asarray(rs.randint(0, 41, 11))
  weights, coef = jnp.asarray(rs.rand(11), jnp.float32), jnp.asarray(rs.randn(11), jnp.float32)
  plain = lambda p, h: jnp.sum(coef * weights * loss_lib.token_nll(p, h, targets, cfg))
  fused = lambda p, h: jnp.sum(coef * loss_lib.weighted_token_nll(p, h, targets, weights, cfg, 4))
  for a, b in zip(jax.tree.leaves(jax.grad(fused, (0, 1))(params, h)), jax.tree.leaves(jax.grad(plain, (0, 1))(params, h))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("chunk,n", [(512, 3756), (512, 3628), (512, 512), (512, 513), (16, 100),
                                     (7, 30), (512, 4096), (500, 1001)])
def test_chunks_are_balanced(chunk, n):
  """At most `chunk` positions a chunk, as few chunks as that allows, and under 8 positions of padding each."""
  size = loss_lib.chunk_size(chunk, n)
  chunks = -(-n // size)
  assert size <= chunk and chunks == -(-n // chunk)
  assert chunks * size - n < 8 * chunks


def test_chunk_size_without_chunking():
  assert loss_lib.chunk_size(0, 100) == 100 and loss_lib.chunk_size(512, 300) == 300
