"""A tiny "pretrained LLM" for CPU simulation: a small Llama trained in-process on the public catalog text.

Real users point `model.hf_dir` at a local Hugging Face checkpoint. Without one, federated fine-tuning
starts from a tiny Llama whose full weights are first trained on title lists written as they appear in
prompts (`"Title A", "Title B", ...`), so that it knows the catalog's words before any client data is
seen. The result is saved as a Hugging Face directory (config, safetensors, tokenizer) keyed by a
fingerprint of everything it depends on, and reused when the fingerprint matches.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from fellrec_jax import files
from fellrec_jax.model import hf_interop
from fellrec_jax.model import lora as lora_lib
from fellrec_jax.model import loss as loss_lib
from fellrec_jax.model import llama as model_lib
from fellrec_jax.data.records import format_titles

logger = logging.getLogger(__name__)
FINGERPRINT_FILE = "fellrec_pretrain.json"
_NO_LORA = lora_lib.LoraConfig(dropout=0.0)


def title_rows(tokenizer, titles, *, rows: int, row_len: int, rng: np.random.Generator) -> np.ndarray:
  """[rows, row_len] token rows (-1 = padding) of BOS + titles in the prompts' list format, cut to row_len.

  Half the rows list random titles; the other half list a run of the alphabetically sorted catalog, as a
  catalog listing does, so that the base model sees related titles (a series' installments, platforms)
  next to each other: the kind of world knowledge a real pretrained LLM brings.
  """
  ordered = sorted(titles)
  count = min(len(titles), row_len // 4 + 1)
  out = np.full((rows, row_len), -1, np.int64)
  for r in range(rows):
    if r % 2:
      start = int(rng.integers(len(ordered)))
      picks = [ordered[(start + i) % len(ordered)] for i in range(count)]
    else:
      picks = [titles[i] for i in rng.choice(len(titles), size=count, replace=False)]
    ids = tokenizer(format_titles(picks), add_special_tokens=True)["input_ids"][:row_len]
    out[r, :len(ids)] = ids
  return out


def _loss(base, tokens, mask, cfg):
  inputs = model_lib.plain_inputs(tokens, mask)
  h = model_lib.forward_hidden(base, {}, inputs, cfg, _NO_LORA)
  labels = mask.astype(jnp.float32).at[:, 0].set(0.0)
  total, count = loss_lib.packed_nll(base, h, inputs, labels, jnp.zeros((0,)), cfg)
  return total / count


def _optimizer(steps: int, learning_rate: float) -> optax.GradientTransformation:
  return optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 10), steps),
                     weight_decay=0.01)


# A module-level program, so that several runs in one process (a study, the tests) trace and compile it once.
@functools.partial(jax.jit, static_argnames=("cfg", "steps", "learning_rate"))
def _step(base, opt_state, tokens, mask, *, cfg, steps: int, learning_rate: float):
  loss, grads = jax.value_and_grad(_loss)(base, tokens, mask, cfg)
  updates, opt_state = _optimizer(steps, learning_rate).update(grads, opt_state, base)
  return optax.apply_updates(base, updates), opt_state, loss


def pretrain(cfg: model_lib.LlamaConfig, tokenizer, titles, *, steps: int, rows: int, row_len: int,
             learning_rate: float, seed: int) -> tuple[dict, list[float]]:
  """Full-parameter AdamW on title lists; (params, per-step losses)."""
  base = model_lib.init_params(cfg, jax.random.PRNGKey(seed))
  opt_state = _optimizer(steps, learning_rate).init(base)
  rng = np.random.default_rng(seed)
  losses = []
  for _ in tqdm(range(steps), desc="pretraining the tiny base model", unit="step"):
    rows_ = title_rows(tokenizer, titles, rows=rows, row_len=row_len, rng=rng)
    mask = rows_ >= 0
    base, opt_state, loss = _step(base, opt_state, np.where(mask, rows_, 0), mask.astype(np.int32), cfg=cfg,
                                  steps=steps, learning_rate=learning_rate)
    losses.append(float(loss))
  return base, losses


def fingerprint(cfg: model_lib.LlamaConfig, tokenizer, titles, settings: dict) -> str:
  payload = json.dumps({"model": repr(cfg), "vocab": tokenizer.get_vocab(), "titles": list(titles),
                        "settings": settings}, sort_keys=True)
  return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_or_pretrain(out_dir, cfg: model_lib.LlamaConfig, tokenizer, titles, **settings):
  """(config, params) of the tiny base in out_dir, pretraining and saving it first unless it matches."""
  out_dir = Path(out_dir)
  key = fingerprint(cfg, tokenizer, titles, settings)
  marker = out_dir / FINGERPRINT_FILE
  if marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == key:
    logger.info("reusing the pretrained tiny base model in %s", out_dir)
    return hf_interop.load_llama(out_dir, dtype=cfg.dtype)
  base, losses = pretrain(cfg, tokenizer, titles, **settings)
  logger.info("pretrained the tiny base model: loss %.3f -> %.3f over %d steps", losses[0], losses[-1],
              len(losses))
  hf_interop.save_llama(out_dir, cfg, base)
  tokenizer.save_pretrained(str(out_dir))
  files.write_json(marker, {"fingerprint": key, "first_loss": losses[0], "last_loss": losses[-1],
                            "settings": settings})
  return cfg, jax.tree.map(np.asarray, base)
