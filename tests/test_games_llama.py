"""configs/games_llama.py: the 1B-class recipe is a valid config whose split fits the model it names."""

import pytest
import transformers

from configs import games, games_llama
from fellrec_jax.model import hf_interop
from fellrec_jax.model import split as split_lib
from fellrec_jax.run import setup as setup_lib


def llama_1b_config(path):
  """Llama-3.2-1B's config.json (shape only: no weights)."""
  transformers.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                           architectures=["LlamaForCausalLM"]).save_pretrained(str(path))
  return hf_interop.load_config(path, dtype="bfloat16")


@pytest.mark.parametrize("arg", [None, "smoke", "reference"])
def test_recipe_is_valid_and_its_split_fits_a_1b_llama(arg, tmp_path):
  c = games_llama.get_config(arg)
  assert c.model.dtype == "bfloat16" and c.model.hf_dir == c.data.tokenizer_path == games_llama.HF_DIR
  llama_1b_config(tmp_path)
  c.model.hf_dir = str(tmp_path)  # the recipe's checkpoint stands in by its config.json alone
  setup_lib.validate_config(c)
  assert (c.model.loss_chunk, c.fed.clients_per_chunk, c.train.accum_steps) == (2048, 1, 4)
  assert c.data.batch_size % c.train.accum_steps == 0
  split_lib.check_split(llama_1b_config(tmp_path), c.fed.split_k)
  assert c.train.learning_rate == (games.REFERENCE["train.learning_rate"] if arg == "reference" else 2e-4)
  assert c.fellrec.sequential_update == (arg == "reference")


def test_unknown_argument():
  with pytest.raises(ValueError, match="unknown config argument 'x'"):
    games_llama.get_config("x")
