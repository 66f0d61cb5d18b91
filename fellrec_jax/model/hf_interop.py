"""Hugging Face interop: Llama checkpoints (config.json + safetensors) and PEFT LoRA adapters.

The model's modules are named as Hugging Face names them, so a variable's path in the NNX state gives its
tensor name: base["layers"]["self_attn"]["q_proj"]["kernel"][i] is `model.layers.{i}.self_attn.q_proj.weight`
(transposed: our kernels are [in, out], stacked over layers; Hugging Face stores one [out, in] tensor per
layer). Loading walks the abstract state of the model (`nnx.eval_shape`) and fills each variable with its
checked tensors. Everything here is local-disk only: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from fellrec_jax import files
from fellrec_jax.model import lora as lora_lib
from fellrec_jax.model import llama as model_lib

_HF_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_PEFT_PREFIX = "base_model.model.model.layers"


class CheckpointError(ValueError):
  """A checkpoint or adapter directory that cannot be used, with the file and the key at fault."""


# ----------------------------------------------------------------------------------------------------
# Configs


def config_from_hf(hf_config: transformers.LlamaConfig, dtype: str = "float32") -> model_lib.LlamaConfig:
  """Our LlamaConfig from a transformers LlamaConfig (rope parameters in either the old or new format)."""
  rope = dict(hf_config.rope_parameters or {})
  theta = rope.pop("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
  rope.setdefault("rope_type", rope.pop("type", "default"))
  if rope["rope_type"] == "default":
    rope = {"rope_type": "default"}
  eos = hf_config.eos_token_id
  return model_lib.LlamaConfig(
      vocab_size=hf_config.vocab_size,
      hidden_size=hf_config.hidden_size,
      intermediate_size=hf_config.intermediate_size,
      num_layers=hf_config.num_hidden_layers,
      num_heads=hf_config.num_attention_heads,
      num_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
      head_dim=hf_config.head_dim or hf_config.hidden_size // hf_config.num_attention_heads,
      rms_norm_eps=hf_config.rms_norm_eps,
      rope_theta=float(theta),
      rope_scaling=tuple(sorted(rope.items())) if rope["rope_type"] != "default" else (),
      max_position_embeddings=hf_config.max_position_embeddings,
      tie_word_embeddings=bool(hf_config.tie_word_embeddings),
      attention_bias=bool(hf_config.attention_bias),
      mlp_bias=bool(hf_config.mlp_bias),
      initializer_range=hf_config.initializer_range,
      bos_token_id=hf_config.bos_token_id,
      eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos,
      pad_token_id=hf_config.pad_token_id,
      dtype=dtype,
  )


def config_to_hf(cfg: model_lib.LlamaConfig) -> transformers.LlamaConfig:
  rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **dict(cfg.rope_scaling)}
  return transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
      rope_parameters=rope, max_position_embeddings=cfg.max_position_embeddings,
      tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias,
      initializer_range=cfg.initializer_range, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
      pad_token_id=cfg.pad_token_id, architectures=["LlamaForCausalLM"])


def load_config(hf_dir: str | os.PathLike, dtype: str = "float32") -> model_lib.LlamaConfig:
  path = Path(hf_dir) / "config.json"
  if not path.is_file():
    raise CheckpointError(f"{path}: no config.json (expected a Hugging Face Llama checkpoint directory)")
  raw = read_json(path, dict)
  if raw.get("model_type") != "llama":
    raise CheckpointError(f"{path}: model_type is {raw.get('model_type')!r}; only 'llama' is supported")
  architectures = raw.get("architectures") or ["LlamaForCausalLM"]
  if "LlamaForCausalLM" not in architectures:
    raise CheckpointError(f"{path}: architectures is {architectures!r}; only LlamaForCausalLM (a causal language "
                          "model with its LM head) is supported")
  try:
    hf_config = transformers.AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    return config_from_hf(hf_config, dtype)
  except (TypeError, ValueError, KeyError, NotImplementedError, ZeroDivisionError) as error:
    raise CheckpointError(f"{path}: {type(error).__name__}: {error}") from None


def read_json(path: Path, kind: type = dict):
  """The JSON value of a file, which must be of `kind` (dict or list); a clear error naming the file."""
  try:
    value = json.loads(Path(path).read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise CheckpointError(f"{path}: not valid JSON ({error})") from None
  if not isinstance(value, kind):
    raise CheckpointError(f"{path}: expected a JSON {'object' if kind is dict else 'list'}, got "
                          f"{type(value).__name__}")
  return value


# ----------------------------------------------------------------------------------------------------
# Base weights


def _safetensors_files(hf_dir: Path) -> list[Path]:
  index = hf_dir / "model.safetensors.index.json"
  if index.is_file():
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise CheckpointError(f"{index}: field 'weight_map' (tensor name -> shard file) is missing or empty")
    shards = [hf_dir / str(name) for name in sorted(set(map(str, weight_map.values())))]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
      raise CheckpointError(f"{index}: field 'weight_map' names shard files that are missing: {missing[:3]}")
    return shards
  single = hf_dir / "model.safetensors"
  if single.is_file():
    return [single]
  raise CheckpointError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json (only safetensors "
                        "checkpoints are supported; convert .bin files with transformers' save_pretrained)")


def _read_tensors(paths: list[Path]) -> dict[str, np.ndarray]:
  tensors = {}
  for path in paths:
    try:
      with safe_open(str(path), framework="numpy") as f:
        for key in f.keys():
          tensors[key] = f.get_tensor(key)
    except (SafetensorError, OSError, ValueError, TypeError) as error:
      raise CheckpointError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error})") from None
  return tensors


def _take(tensors: dict, key: str, shape: tuple, where: Path) -> np.ndarray:
  if key not in tensors:
    raise CheckpointError(f"{where}: tensor {key!r} is missing")
  value = tensors.pop(key)
  if tuple(value.shape) != tuple(shape):
    raise CheckpointError(f"{where}: tensor {key!r} has shape {tuple(value.shape)}, config says {tuple(shape)}")
  return value


def _hf_name(path: tuple[str, ...], layer: int | None = None) -> str:
  """The Hugging Face tensor name of a base-state variable (of layer `layer` for the stacked layers)."""
  modules = list(path[:-1])
  if modules[0] == "layers":
    modules.insert(1, str(layer))
  prefix = "" if modules[0] == "lm_head" else "model."
  return prefix + ".".join(modules) + "." + _HF_LEAF[path[-1]]


def _hf_layout(path: tuple[str, ...], array):
  """A variable's value (one layer's) as Hugging Face stores it: kernels transposed."""
  return array.T if path[-1] == "kernel" else array


def load_params(hf_dir: str | os.PathLike, cfg: model_lib.LlamaConfig, param_dtype=None) -> dict:
  """The base state (pure dict) from a Hugging Face Llama directory (single or sharded safetensors)."""
  hf_dir = Path(hf_dir)
  tensors = _read_tensors(_safetensors_files(hf_dir))
  cast = (lambda x: x) if param_dtype is None else (lambda x: x.astype(param_dtype))
  if not cfg.tie_word_embeddings and "lm_head.weight" not in tensors:
    raise CheckpointError(f"{hf_dir}: tensor 'lm_head.weight' is missing and tie_word_embeddings is false")
  if cfg.tie_word_embeddings:
    tensors.pop("lm_head.weight", None)

  def fill(key_path, spec):
    path = tuple(k.key for k in key_path)
    kernel = path[-1] == "kernel"
    take = lambda name, shape: _hf_layout(path, _take(tensors, name, shape[::-1] if kernel else shape, hf_dir))
    if path[0] == "layers":
      return cast(np.stack([take(_hf_name(path, i), spec.shape[1:]) for i in range(spec.shape[0])]))
    return cast(take(_hf_name(path), spec.shape))

  params = jax.tree_util.tree_map_with_path(fill, model_lib.abstract_states(cfg)[0])
  unused = [k for k in tensors if "rotary_emb" not in k]
  if unused:
    raise CheckpointError(f"{hf_dir}: unexpected tensors {sorted(unused)[:5]} (not a plain Llama checkpoint?)")
  return jax.tree.map(np.ascontiguousarray, params)


def load_llama(hf_dir, dtype: str = "float32", param_dtype=None):
  """(config, base state) of a local Hugging Face Llama checkpoint directory."""
  cfg = load_config(hf_dir, dtype)
  return cfg, load_params(hf_dir, cfg, param_dtype)


def load_model(hf_dir, lcfg: lora_lib.LoraConfig, adapter_key: jax.Array | None = None, dtype: str = "float32",
               param_dtype=None) -> model_lib.Llama:
  """The `Llama` module of a local Hugging Face checkpoint, with fresh adapters (PEFT's initialisation
  from `adapter_key`, default key 0): its `nnx.split(model, Adapter, ...)` gives the states a run trains."""
  cfg, base = load_llama(hf_dir, dtype, param_dtype)
  key = jax.random.key(0) if adapter_key is None else adapter_key
  return model_lib.merge(cfg, lcfg, base, lora_lib.init_adapters(cfg, lcfg, key))


def save_model(hf_dir, model: model_lib.Llama, max_shard_bytes: int | None = None) -> None:
  """The module's base as a Hugging Face checkpoint (its adapters: `save_peft_adapter`)."""
  save_llama(hf_dir, model.config, model_lib.states(model)[0], max_shard_bytes)


def save_llama(hf_dir, cfg: model_lib.LlamaConfig, params: dict, max_shard_bytes: int | None = None) -> None:
  """Write config.json and safetensors of a base state that `LlamaForCausalLM.from_pretrained` loads."""
  hf_dir = Path(hf_dir)
  hf_dir.mkdir(parents=True, exist_ok=True)
  config_to_hf(cfg).save_pretrained(str(hf_dir))
  tensors = {}
  for key_path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    path, value = tuple(k.key for k in key_path), np.asarray(value)
    if path[0] == "layers":
      tensors.update({_hf_name(path, i): _hf_layout(path, value[i]) for i in range(value.shape[0])})
    else:
      tensors[_hf_name(path)] = _hf_layout(path, value)
  _write_safetensors(hf_dir, {k: np.ascontiguousarray(v) for k, v in tensors.items()}, max_shard_bytes)


def _write_safetensors(hf_dir: Path, tensors: dict, max_shard_bytes: int | None) -> None:
  metadata = {"format": "pt"}
  if not max_shard_bytes or sum(v.nbytes for v in tensors.values()) <= max_shard_bytes:
    with files.atomic_path(hf_dir / "model.safetensors") as tmp:
      save_file(tensors, str(tmp), metadata=metadata)
    return
  shards, current, size = [], {}, 0
  for key, value in tensors.items():
    if current and size + value.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[key] = value
    size += value.nbytes
  shards.append(current)
  weight_map = {}
  for i, shard in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    with files.atomic_path(hf_dir / name) as tmp:
      save_file(shard, str(tmp), metadata=metadata)
    weight_map.update({key: name for key in shard})
  index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
  files.write_json(hf_dir / "model.safetensors.index.json", index)


# ----------------------------------------------------------------------------------------------------
# PEFT adapters


def save_peft_adapter(out_dir, adapters: dict, lcfg: lora_lib.LoraConfig, base_model_name_or_path: str = "") -> None:
  """adapter_config.json + adapter_model.safetensors in PEFT's LoRA format."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lcfg.rank, "lora_alpha": lcfg.alpha,
      "lora_dropout": lcfg.dropout, "target_modules": sorted(lcfg.targets), "use_rslora": lcfg.use_rslora,
      "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
      "base_model_name_or_path": base_model_name_or_path, "init_lora_weights": True,
  }
  files.write_json(out_dir / "adapter_config.json", config)
  tensors = {}
  for name, ab in lora_lib.projection_adapters(adapters).items():
    a, b = np.asarray(ab["lora_a"]), np.asarray(ab["lora_b"])
    for i in range(a.shape[0]):
      key = f"{_PEFT_PREFIX}.{i}.{lora_lib.block_of(name)}.{name}"
      tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
      tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
  with files.atomic_path(out_dir / "adapter_model.safetensors") as tmp:
    save_file(tensors, str(tmp), metadata={"format": "pt"})


def load_peft_config(adapter_dir) -> lora_lib.LoraConfig:
  path = Path(adapter_dir) / "adapter_config.json"
  if not path.is_file():
    raise CheckpointError(f"{path}: no adapter_config.json (expected a PEFT LoRA adapter directory)")
  raw = read_json(path)
  if raw.get("peft_type", "LORA") != "LORA":
    raise CheckpointError(f"{path}: peft_type {raw.get('peft_type')!r} is not LORA")
  for field in ("rank_pattern", "alpha_pattern", "layers_to_transform"):
    if raw.get(field):
      raise CheckpointError(f"{path}: field {field!r} is not supported (per-layer LoRA settings)")
  if raw.get("use_dora"):
    raise CheckpointError(f"{path}: field 'use_dora' is true; DoRA is not supported")
  targets = raw.get("target_modules")
  if isinstance(targets, str) or not targets:
    raise CheckpointError(f"{path}: field 'target_modules' must be a list of projection names, got {targets!r}")
  absent = [t for t in targets if t not in lora_lib.ALL_TARGETS]
  if absent:
    raise CheckpointError(f"{path}: field 'target_modules' names {absent}, which a Llama decoder layer does not "
                          f"have (its projections: {', '.join(lora_lib.ALL_TARGETS)})")
  for field in ("r", "lora_alpha"):
    if field not in raw:
      raise CheckpointError(f"{path}: field {field!r} is missing")
    if isinstance(raw[field], bool) or not isinstance(raw[field], (int, float)):
      raise CheckpointError(f"{path}: field {field!r} must be a number, got {raw[field]!r}")
  if raw["r"] != int(raw["r"]) or raw["r"] < 1:
    raise CheckpointError(f"{path}: field 'r' (the LoRA rank) must be an integer >= 1, got {raw['r']!r}")
  try:
    return lora_lib.LoraConfig(rank=int(raw["r"]), alpha=float(raw["lora_alpha"]),
                               dropout=float(raw.get("lora_dropout", 0.0)),
                               targets=tuple(sorted(targets)), use_rslora=bool(raw.get("use_rslora", False)))
  except (TypeError, ValueError) as error:
    raise CheckpointError(f"{path}: {error}") from None


def load_peft_adapter(adapter_dir, cfg: model_lib.LlamaConfig):
  """(LoraConfig, adapter state) from a PEFT LoRA directory saved for a LlamaForCausalLM."""
  adapter_dir = Path(adapter_dir)
  lcfg = load_peft_config(adapter_dir)
  path = adapter_dir / "adapter_model.safetensors"
  if not path.is_file():
    raise CheckpointError(f"{path}: missing (only safetensors adapters are supported)")
  tensors = _read_tensors([path])
  shapes = lora_lib.projection_shapes(cfg)
  layers = {}
  for name in lcfg.targets:
    fan_in, fan_out = shapes[name]
    a, b = [], []
    for i in range(cfg.num_layers):
      key = f"{_PEFT_PREFIX}.{i}.{lora_lib.block_of(name)}.{name}"
      a.append(_take(tensors, f"{key}.lora_A.weight", (lcfg.rank, fan_in), path).T)
      b.append(_take(tensors, f"{key}.lora_B.weight", (fan_out, lcfg.rank), path).T)
    layers.setdefault(lora_lib.block_of(name), {})[name] = {"lora_a": np.stack(a).astype(np.float32),
                                                            "lora_b": np.stack(b).astype(np.float32)}
  if tensors:
    raise CheckpointError(f"{path}: unexpected tensors {sorted(tensors)[:5]}")
  return lcfg, {"layers": layers}
