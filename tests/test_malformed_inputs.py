"""The malformed-input corpus: every case is a clear error naming the file (or the config field) at fault,
raised by validation before anything is compiled, never a traceback from inside JAX.

One test per family, parametrised over its cases; the data-file families (BIGRec records, tables, Amazon
files, partitions) live in tests/test_data_errors.py, which also checks DataError's record index and field.
docs/robustness.md lists the whole corpus in one table.
"""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import make_hf_model
from configs import default
from fellrec_jax.data import synthetic
from fellrec_jax.data.tokenizer import train_bpe_tokenizer
from fellrec_jax.model import hf_interop
from fellrec_jax.model import lora as lora_lib
from fellrec_jax.run import adapters as adapters_lib
from fellrec_jax.run import setup as setup_lib
from fellrec_jax.run import train
from test_train import smoke

CheckpointError = hf_interop.CheckpointError

# ---------------------------------------------------------------- synthetic knobs

SYNTHETIC_CASES = [
    ({"num_users": 0}, "data.synthetic.num_users must be an integer >= 1, got 0"),
    ({"num_series": -1}, "data.synthetic.num_series must be an integer >= 1"),
    ({"max_installments": 1}, r"data.synthetic.max_installments must be an integer in \[2, 5\]"),
    ({"max_installments": 9}, r"data.synthetic.max_installments must be an integer in \[2, 5\], got 9"),
    ({"num_groups": 0}, "data.synthetic.num_groups"),
    ({"mean_length": 0}, "data.synthetic.mean_length must be a number > 0"),
    ({"min_length": 1}, "data.synthetic.min_length must be an integer >= 2"),
    ({"min_length": 50}, "data.synthetic.min_length=50 is above data.synthetic.max_length=40"),
    ({"sequel_prob": (0.5,)}, "data.synthetic.sequel_prob must be a pair of probabilities"),
    ({"sequel_prob": (0.5, 1.5)}, "data.synthetic.sequel_prob must be a pair of probabilities"),
    ({"genre_prob": -0.1}, r"data.synthetic.genre_prob must be a probability in \[0, 1\]"),
    ({"family_boost": 0}, "data.synthetic.family_boost must be a number > 0"),
    ({"min_span": 0.0}, r"data.synthetic.min_span must be a number in \(0, 1\]"),
    ({"popularity_shape": float("nan")}, "data.synthetic.popularity_shape must be a number > 0, got nan"),
    ({"k_core": 0}, "data.synthetic.k_core"),
    ({"window": "10"}, "data.synthetic.window must be an integer >= 1, got '10'"),
    ({"num_user": 10}, "data.synthetic.num_user: unknown synthetic setting"),
]


@pytest.mark.parametrize("overrides,message", SYNTHETIC_CASES, ids=[m[:40] for _, m in SYNTHETIC_CASES])
def test_synthetic_knobs(overrides, message):
  with pytest.raises(ValueError, match=message):
    synthetic.check_config(overrides)
  config = default.get_config("smoke")  # the run's validation reaches them too
  try:
    config.data.synthetic.update(overrides)
  except (TypeError, KeyError):  # a type or field the ConfigDict itself refuses
    return
  with pytest.raises(ValueError, match=message):
    setup_lib.validate_config(config)


# ---------------------------------------------------------------- configs

CONFIG_CASES = [
    ({"fed.aggregator": "fedsgd"}, "fed.aggregator='fedsgd' is unknown"),
    ({"fed.rounds": 0}, "fed.rounds must be >= 1, got 0"),
    ({"fed.local_epochs": 0}, "fed.local_epochs must be >= 1"),
    ({"fed.num_clients": -1}, "fed.num_clients must be >= 1"),
    ({"fed.adapter_init": "zeros"}, "fed.adapter_init must be 'per_client' or 'shared', got 'zeros'"),
    ({"fed.server_adapters": "none"}, "fed.server_adapters must be"),
    ({"fellrec.heat_apply_to": "lr"}, "fellrec.heat_apply_to must be"),
    ({"fellrec.temperature": 0.0}, "fellrec.temperature and fellrec.beta must be > 0"),
    ({"train.accum_steps": 0}, "train.accum_steps must be >= 1"),
    ({"checkpoint_every": 0}, "checkpoint_every must be >= 1"),
    ({"model.init_adapters": "/nonexistent/adapters"}, "model.init_adapters='/nonexistent/adapters': no such"),
    ({"fed.split_k": 4}, r"split_k=4 is impossible for a model with num_layers=4"),
    ({"fed.split_k": -1}, r"split_k=-1 is impossible"),
    ({"lora.rank": 0}, "lora: LoRA rank must be >= 1, got 0"),
    ({"lora.targets": ("q_proj", "c_attn")}, r"lora: unknown LoRA target\(s\) \['c_attn'\]"),
    ({"lora.dropout": 1.0}, r"lora: LoRA dropout must be in \[0, 1\)"),
    ({"model.dtype": "float16"}, "model.dtype must be 'float32' or 'bfloat16', got 'float16'"),
    ({"model.num_heads": 3}, "model.num_heads=3 must divide model.hidden_size=32"),
    ({"model.num_kv_heads": 2, "model.num_heads": 1}, "model.num_kv_heads=2 must divide model.num_heads"),
    ({"data.batch_size": 0}, "data.batch_size must be an integer >= 1, got 0"),
    ({"data.cutoff_len": 0}, "data.cutoff_len must be an integer >= 1, got 0"),
    ({"train.learning_rate": 0.0}, "train.learning_rate must be a number > 0, got 0.0"),
    ({"train.schedule": "cosine"}, "train.schedule must be 'linear' or 'constant', got 'cosine'"),
    ({"eval.mode": "sampling"}, "eval.mode='sampling' is unknown"),
    ({"eval.ks": ()}, r"eval.ks must be cut-offs >= 1, got \(\)"),
    ({"keep_checkpoints": 0}, "keep_checkpoints must be an integer >= 1, got 0"),
    ({"model.hf_dir": "/nonexistent/llama"}, "model.hf_dir='/nonexistent/llama': no such directory"),
]


def _config(overrides):
  return smoke(**overrides)


@pytest.mark.parametrize("overrides,message", CONFIG_CASES, ids=[m[:40] for _, m in CONFIG_CASES])
def test_impossible_configs(overrides, message):
  with pytest.raises(ValueError, match=message):
    setup_lib.validate_config(_config(overrides))


def test_a_run_with_an_impossible_config_stops_before_any_work(tmp_path):
  with pytest.raises(ValueError, match="split_k=4 is impossible"):
    train.train(_config({"fed.split_k": 4}), tmp_path / "run")
  assert not (tmp_path / "run").exists()  # nothing built, nothing compiled


# ---------------------------------------------------------------- Hugging Face checkpoints


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny random Llama (2 layers, vocab 97, untied) saved as Hugging Face saves it."""
  path = tmp_path_factory.mktemp("hf") / "llama"
  make_hf_model(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2).save_pretrained(str(path))
  return path


def _edit_json(name, **changes):
  """Set (None: remove) fields of the JSON object in file `name`."""
  def edit(d):
    raw = json.loads((d / name).read_text())
    for key, value in changes.items():
      if value is None:
        raw.pop(key, None)
      else:
        raw[key] = value
    (d / name).write_text(json.dumps(raw))
  return edit


def _edit_safetensors(name, edit_dict):
  """Apply `edit_dict` to the tensors of file `name`."""
  def edit(d):
    tensors = load_file(str(d / name))
    edit_dict(tensors)
    save_file(tensors, str(d / name), metadata={"format": "pt"})
  return edit


def _edit_config(**changes):
  return _edit_json("config.json", **changes)


def _edit_tensors(edit_dict):
  return _edit_safetensors("model.safetensors", edit_dict)


def _shard(index_text=None, shard_names=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")):
  """Sharded weights with an index; `index_text` replaces the index's text."""
  def edit(d):
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(tensors)
    save_file({k: tensors[k] for k in keys[: len(keys) // 2]}, str(d / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {k: shard_names[i >= len(keys) // 2] for i, k in enumerate(keys)}}
    (d / "model.safetensors.index.json").write_text(index_text if index_text is not None else json.dumps(index))
  return edit


def _write(name, text):
  return lambda d: (d / name).write_text(text)


def _truncate(name):
  return lambda d: (d / name).write_bytes((d / name).read_bytes()[:100])


Q1 = "model.layers.1.self_attn.q_proj.weight"
HF_CASES = {
    "no config.json": (lambda d: (d / "config.json").unlink(), "config.json: no config.json"),
    "config.json not JSON": (_write("config.json", '{"model_type": "llama",'), "config.json: not valid JSON"),
    "config.json a list": (_write("config.json", "[]"), "config.json: expected a JSON object, got list"),
    "model_type gpt2": (_edit_config(model_type="gpt2"), "config.json: model_type is 'gpt2'; only 'llama'"),
    "model_type missing": (_edit_config(model_type=None), "config.json: model_type is None"),
    "sequence classifier": (_edit_config(architectures=["LlamaForSequenceClassification"]),
                            "config.json: architectures is \\['LlamaForSequenceClassification'\\]"),
    "kv heads not dividing": (_edit_config(num_key_value_heads=3), "config.json: .*num_kv_heads=3"),
    "unsupported rope": (_edit_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
                         "config.json: .*rope_type 'dynamic' is not supported"),
    "no safetensors": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    "truncated safetensors": (_truncate("model.safetensors"), "model.safetensors: not a readable safetensors"),
    "missing tensor": (_edit_tensors(lambda t: t.pop(Q1)), f"tensor '{Q1}' is missing"),
    "wrong-shaped tensor": (_edit_tensors(lambda t: t.update({Q1: t[Q1][:, :32].copy()})),
                            f"tensor '{Q1}' has shape \\(64, 32\\), config says \\(64, 64\\)"),
    "unexpected tensor": (_edit_tensors(lambda t: t.update({"model.layers.0.self_attn.q_norm.weight":
                                                            np.ones(16, np.float32)})),
                          "unexpected tensors \\['model.layers.0.self_attn.q_norm.weight'\\]"),
    "lm_head missing": (_edit_tensors(lambda t: t.pop("lm_head.weight")),
                        "'lm_head.weight' is missing and tie_word_embeddings is false"),
    "vocab unlike embeddings": (_edit_config(vocab_size=50),
                                "tensor 'model.embed_tokens.weight' has shape \\(97, 64\\), config says \\(50, 64\\)"),
    "index not JSON": (_shard("{"), "model.safetensors.index.json: not valid JSON"),
    "index without weight_map": (_shard("{}"), "index.json: field 'weight_map' .* is missing or empty"),
    "index names a missing shard": (_shard(), "index.json: field 'weight_map' names shard files that are missing: "
                                              "\\['model-00002-of-00002.safetensors'\\]"),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_broken_hf_checkpoints(tmp_path, hf_dir, case):
  edit, message = HF_CASES[case]
  broken = tmp_path / "llama"
  shutil.copytree(hf_dir, broken)
  edit(broken)
  with pytest.raises(CheckpointError, match=message) as info:
    hf_interop.load_llama(broken)
  assert str(broken) in str(info.value)


class _Tokenizer:
  def __init__(self, size, eos=2):
    self.size, self.bos_token_id, self.eos_token_id, self.pad_token_id = size, 1, eos, 0

  def __len__(self):
    return self.size


@pytest.mark.parametrize("tokenizer,message", [
    (None, "config.json: vocab_size is 97 but the tokenizer has [0-9]+ tokens: set data.tokenizer_path"),
    (_Tokenizer(90, eos=120), "config.json: the tokenizer's eos_token_id 120 is outside vocab_size 97"),
])
def test_a_tokenizer_that_does_not_match_the_model(hf_dir, tokenizer, message):
  tokenizer = tokenizer or train_bpe_tokenizer(["Game Title " * 20, "Another one - PC"], vocab_size=300)
  with pytest.raises(CheckpointError, match=message):
    setup_lib.check_tokenizer(tokenizer, hf_interop.load_config(hf_dir), hf_dir)


def test_split_k_beyond_an_hf_checkpoints_layers(hf_dir):
  with pytest.raises(ValueError, match="split_k=2 is impossible for a model with num_layers=2"):
    setup_lib.validate_config(_config({"model.hf_dir": str(hf_dir), "fed.split_k": 2}))


# ---------------------------------------------------------------- PEFT adapters

LCFG = lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory, hf_dir):
  """A rank-4 adapter on q_proj and v_proj of the tiny model, as save_peft_adapter (PEFT's format) writes it."""
  cfg = hf_interop.load_config(hf_dir)
  adapters = lora_lib.init_adapters(cfg, LCFG, __import__("jax").random.key(0))
  path = tmp_path_factory.mktemp("peft") / "adapter"
  hf_interop.save_peft_adapter(path, adapters, LCFG)
  return path


def _edit_peft(**changes):
  return _edit_json("adapter_config.json", **changes)


def _edit_peft_tensors(edit_dict):
  return _edit_safetensors("adapter_model.safetensors", edit_dict)


def _other_width(d):
  tensors = load_file(str(d / "adapter_model.safetensors"))
  save_file({k: np.zeros((4, 32), np.float32) if "lora_A" in k else v for k, v in tensors.items()},
            str(d / "adapter_model.safetensors"))


A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
A1 = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
PEFT_CASES = {
    "no adapter_config.json": (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
    "config not JSON": (_write("adapter_config.json", "{'r': 4}"), "adapter_config.json: not valid JSON"),
    "peft_type prefix tuning": (_edit_peft(peft_type="PREFIX_TUNING"), "peft_type 'PREFIX_TUNING' is not LORA"),
    "target_modules a string": (_edit_peft(target_modules="q_proj"), "field 'target_modules' must be a list"),
    "target_modules empty": (_edit_peft(target_modules=[]), "field 'target_modules' must be a list"),
    "target absent (c_attn)": (_edit_peft(target_modules=["c_attn"]),
                               "field 'target_modules' names \\['c_attn'\\], which a Llama decoder layer does not"),
    "target absent (lm_head)": (_edit_peft(target_modules=["q_proj", "lm_head"]),
                                "field 'target_modules' names \\['lm_head'\\]"),
    "r missing": (_edit_peft(r=None), "adapter_config.json: field 'r' is missing"),
    "r zero": (_edit_peft(r=0), "field 'r' \\(the LoRA rank\\) must be an integer >= 1, got 0"),
    "r a string": (_edit_peft(r="4"), "field 'r' must be a number, got '4'"),
    "lora_alpha missing": (_edit_peft(lora_alpha=None), "field 'lora_alpha' is missing"),
    "rank_pattern": (_edit_peft(rank_pattern={"q_proj": 8}), "field 'rank_pattern' is not supported"),
    "use_dora": (_edit_peft(use_dora=True), "field 'use_dora' is true"),
    "no safetensors": (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors: missing"),
    "truncated safetensors": (_truncate("adapter_model.safetensors"),
                              "adapter_model.safetensors: not a readable safetensors"),
    "tensors of another rank": (_edit_peft(r=8), f"tensor '{A0}' has shape \\(4, 64\\), config says \\(8, 64\\)"),
    "a missing layer": (_edit_peft_tensors(lambda t: t.pop(A1)), f"tensor '{A1}' is missing"),
    "an unexpected tensor": (_edit_peft_tensors(lambda t: t.update({A1.replace("q_proj", "k_proj"): t[A1]})),
                             "unexpected tensors"),
    "another model width": (_other_width, "has shape \\(4, 32\\), config says \\(4, 64\\)"),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_broken_peft_adapters(tmp_path, hf_dir, peft_dir, case):
  edit, message = PEFT_CASES[case]
  broken = tmp_path / "adapter"
  shutil.copytree(peft_dir, broken)
  edit(broken)
  with pytest.raises(CheckpointError, match=message) as info:
    hf_interop.load_peft_adapter(broken, hf_interop.load_config(hf_dir))
  assert str(broken) in str(info.value)


def test_adapters_a_run_cannot_start_from(tmp_path, hf_dir, peft_dir):
  cfg = hf_interop.load_config(hf_dir)
  run_lcfg = lora_lib.LoraConfig(rank=8, alpha=8.0, targets=("q_proj", "v_proj"))
  with pytest.raises(CheckpointError, match="adapter_config.json: r is 4 but the run's lora.rank is 8"):
    adapters_lib.init_adapters(peft_dir, cfg, run_lcfg, 2)
  (tmp_path / "client_0").mkdir()
  with pytest.raises(CheckpointError, match="neither a PEFT directory .*missing client_0"):
    adapters_lib.init_adapters(tmp_path, cfg, LCFG, 2)
