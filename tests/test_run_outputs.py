"""What a run gives the tools users live in: TensorBoard and W&B files (read back with their own readers),
PEFT adapters exported from the checkpoint (loaded by PEFT, logits against ours) and read back as the
adapters a run starts from."""

import json
import types

import jax
import numpy as np
import peft
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator

from conftest import TINY_CONFIGS, make_hf_model, random_batch, rel_error, to_ours
from fellrec_jax.model import hf_interop
from fellrec_jax.model import llama as model
from fellrec_jax.model import lora
from fellrec_jax.run import adapters as adapters_lib
from fellrec_jax.run import checkpoint
from fellrec_jax.run import setup as setup_lib
from fellrec_jax.run import state as state_lib
from fellrec_jax.run import tracking
from fellrec_jax.run import train
from test_train import smoke

# Under pytest-xdist every test of this module runs on one worker (--dist loadgroup, pyproject.toml),
# so its module fixture (the tracked run) is built once, not once per worker.
pytestmark = pytest.mark.xdist_group("run_outputs")

CLIENT_FIELDS = ("train_loss", "val_loss", "lr", "warm_weight")


def events(logdir):
  acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
  acc.Reload()
  return acc


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
  """One smoke round with TensorBoard and W&B (offline) enabled."""
  workdir = tmp_path_factory.mktemp("tracked")
  config = smoke(**{"fed.rounds": 1, "log.tensorboard": True, "log.wandb_project": "fellrec-test"})
  train.train(config, workdir)
  record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
  return workdir, config, record


def test_tensorboard_events_hold_the_rounds_figures(tracked_run):
  workdir, _, record = tracked_run
  acc = events(workdir / "tensorboard")
  scalars = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
  expected = {"loss/val_weighted": record["val_loss_weighted"], "comm/bytes": record["comm_bytes"],
              "round/seconds": record["seconds"], "fellrec/similarity_offdiag_mean": record["similarity_offdiag_mean"],
              **{f"comm/{k}": v for k, v in record["comm_detail"].items() if k != "total"}}
  for c in record["clients"]:
    expected.update({f"{field}/client_{c['client']}": c[field] for field in CLIENT_FIELDS})
  losses = np.array([c["train_loss"] for c in record["clients"]])
  examples = np.array([c["train_examples"] for c in record["clients"]])
  expected["loss/train_weighted"] = losses @ examples / examples.sum()
  assert len(record["clients"]) == 3 and set(expected) <= set(scalars)
  for tag, value in expected.items():
    assert [e.step for e in scalars[tag]] == [0], tag
    assert scalars[tag][0].value == pytest.approx(value, rel=1e-6), tag
  image = acc.Images("aggregation")
  assert [e.step for e in image] == [0] and image[0].width == image[0].height == 3 * (256 // 3)


def test_wandb_offline_writes_a_run_directory(tracked_run):
  workdir, _, _ = tracked_run
  runs = list((workdir / "wandb").glob("offline-run-*"))
  assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
  assert runs[0].name.endswith((workdir / "wandb_run_id").read_text())


def test_enabling_a_tracker_whose_package_is_missing_is_a_setup_error(monkeypatch):
  real = tracking.importlib.util.find_spec
  monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
  setup_lib.validate_config(smoke(**{"log.tensorboard": True}))  # tensorboardX is there
  with pytest.raises(tracking.TrackingError, match=r"log.wandb_project='p' needs the wandb package.*pip install wandb"):
    setup_lib.validate_config(smoke(**{"log.wandb_project": "p"}))


def test_final_evaluation_and_many_clients(tmp_path):
  config = smoke(**{"log.tensorboard": True, "log.client_scalars": 2})
  run = types.SimpleNamespace(workdir=tmp_path, config=config)
  clients = [{"client": c, "train_loss": 1.0 + c, "val_loss": None if c == 2 else 2.0 * c, "lr": 0.1,
              "warm_weight": 1.0, "train_examples": 1 + c} for c in range(3)]
  record = {"round": 4, "clients": clients, "val_loss_weighted": 0.5, "comm_bytes": 10, "seconds": 2.0,
            "aggregation": np.eye(3).tolist(), "similarity_offdiag_mean": None}
  tracking.log_round(run, record)
  tracking.finish(run, {"rounds_done": 5, "eval": {"hr@10": 0.25, "recall@10": 0.125}})
  acc = events(tmp_path / "tensorboard")
  got = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
  assert got["train_loss/min"] == [(4, 1.0)] and got["train_loss/max"] == [(4, 3.0)]
  assert got["val_loss/mean"] == [(4, 1.0)]  # (0 + 2) / 2: a client without validation loss is left out
  assert got["loss/train_weighted"] == [(4, pytest.approx((1 + 4 + 9) / 6))]
  assert got["eval/hr_10"] == [(5, 0.25)] and got["eval/recall_10"] == [(5, 0.125)]
  assert not any(tag.endswith("client_0") for tag in got) and "fellrec/similarity_offdiag_mean" not in got
  assert not tracking._TRACKERS  # closed at the end


def test_matrix_image():
  image = tracking.matrix_image(np.array([[1.0, 0.0], [0.5, 0.5]]), min_pixels=4)
  assert image.shape == (4, 4, 3) and image.dtype == np.uint8
  assert (image[0, 0] == [253, 231, 37]).all() and (image[0, 2] == [68, 1, 84]).all()  # viridis at 1 and 0
  assert (image[2, 0] == image[3, 3]).all()


# ----------------------------------------------------------------------------------------------------
# Adapters out and in


def test_exported_adapters_load_in_peft_from_their_base_with_our_logits(tracked_run, tmp_path):
  workdir, config, _ = tracked_run
  written = adapters_lib.export_adapters(workdir, tmp_path, clients="1-2")
  assert [p.name for p in written] == ["client_1", "client_2"] and not (tmp_path / "client_0").exists()
  assert json.loads((tmp_path / "client_1/adapter_config.json").read_text())["base_model_name_or_path"] == str(
      (workdir / "base_model").resolve())
  pm = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "client_1")).eval()  # base from the config
  cfg, base = hf_interop.load_llama(workdir / "base_model")
  _, best = adapters_lib.read_checkpoint_adapters(workdir, "best")
  ids, mask = random_batch(cfg.vocab_size)
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  lcfg = adapters_lib.lora_config(config)
  ours = model.forward(base, jax.tree.map(lambda x: x[1], best), model.plain_inputs(ids, mask), cfg, lcfg)
  other = model.forward(base, jax.tree.map(lambda x: x[2], best), model.plain_inputs(ids, mask), cfg, lcfg)
  assert rel_error(ours, ref, mask) <= 1e-5
  assert rel_error(other, ref, mask) > 10 * rel_error(ours, ref, mask)  # client 1's adapters, not another's


def test_a_run_started_from_exported_adapters_begins_with_them(tracked_run, tmp_path):
  workdir, _, _ = tracked_run
  out = tmp_path / "exported"
  adapters_lib.export_adapters(workdir, out)
  _, best = adapters_lib.read_checkpoint_adapters(workdir, "best")
  config = smoke(**{"model.init_adapters": str(out), "pretrain.cache_dir": str(workdir / "base_model")})
  run = setup_lib.setup(config, tmp_path / "run")
  state = state_lib.init_state(run)
  for started in (state.clients.adapters, state.best_adapters):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), started, best)
  one = adapters_lib.init_adapters(out / "client_2", run.model_cfg, run.lcfg, 3)  # one directory for all clients
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.broadcast_to(b[2], a.shape)), one, best)


@pytest.fixture
def hf_tiny(tmp_path):
  hf = make_hf_model(**TINY_CONFIGS["gqa"])
  cfg, base = to_ours(hf, tmp_path)
  return hf, cfg, base, tmp_path / "hf"


def random_stack(cfg, lcfg, num_clients, seed=0):
  fresh = lora.init_adapters(cfg, lcfg, jax.random.PRNGKey(seed))
  leaves, tree = jax.tree.flatten(fresh)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [np.asarray(0.3 * jax.random.normal(k, (num_clients, *x.shape)))
                                   for k, x in zip(keys, leaves)])


def test_export_of_100_clients_from_a_checkpoint(hf_tiny, tmp_path):
  hf, cfg, base, hf_dir = hf_tiny
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
  best, last = random_stack(cfg, lcfg, 100), random_stack(cfg, lcfg, 100, seed=7)
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  config = smoke(**{"model.hf_dir": str(hf_dir), "lora.rank": 4, "lora.alpha": 8.0, "lora.targets": lcfg.targets})
  (run_dir / "config.json").write_text(json.dumps(setup_lib.config_dict(config)))
  state = {"clients": {"adapters": last, "rng": np.zeros((100, 2), np.uint32)}, "global_clients": {},
           "best_adapters": best, "server": {"rounds_done": np.int32(3)}}
  checkpoint.save(checkpoint.manager(run_dir / "checkpoints"), 3, state, {"rounds_done": 3})
  written = adapters_lib.export_adapters(run_dir, tmp_path / "out")
  assert len(written) == 100 and sorted(p.name for p in (tmp_path / "out").iterdir())[:2] == ["client_0", "client_1"]
  stacked = adapters_lib.init_adapters(tmp_path / "out", cfg, lcfg, 100)  # read back: every client's own
  jax.tree.map(np.testing.assert_array_equal, stacked, best)
  adapters_lib.export_adapters(run_dir, tmp_path / "last", clients="57", which="last")
  pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "last/client_57")).eval()
  ids, mask = random_batch(cfg.vocab_size)
  with torch.no_grad():
    ref = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  ours = model.forward(base, jax.tree.map(lambda x: x[57], last), model.plain_inputs(ids, mask), cfg, lcfg)
  base_only = model.forward(base, {}, model.plain_inputs(ids, mask), cfg, lcfg)
  assert rel_error(base_only, ref, mask) > 1e-2 and rel_error(ours, ref, mask) <= 1e-5
  assert json.loads((tmp_path / "last/client_57/adapter_config.json").read_text())["base_model_name_or_path"] == str(
      hf_dir.resolve())


def test_adapter_errors_name_the_file_and_field(hf_tiny, tmp_path):
  _, cfg, _, hf_dir = hf_tiny
  lcfg = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj"))
  adapters_lib.write_client_adapters(tmp_path / "a", random_stack(cfg, lcfg, 2), [0, 1], lcfg, str(hf_dir))
  with pytest.raises(hf_interop.CheckpointError, match=r"client_0/adapter_config.json: r is 4 but the run's lora.rank"):
    adapters_lib.init_adapters(tmp_path / "a", cfg, lora.LoraConfig(rank=8, alpha=8.0, targets=lcfg.targets), 2)
  with pytest.raises(hf_interop.CheckpointError, match=r"missing client_2 and 1 more"):
    adapters_lib.init_adapters(tmp_path / "a", cfg, lcfg, 4)
  with pytest.raises(ValueError, match="model.init_adapters='/nonexistent': no such directory"):
    setup_lib.validate_config(smoke(**{"model.init_adapters": "/nonexistent"}))
  assert adapters_lib.parse_clients("0,3,5-7", 10) == [0, 3, 5, 6, 7] and adapters_lib.parse_clients("all", 2) == [0, 1]
  with pytest.raises(ValueError, match=r"clients \[10\] are not in the run's \[0, 10\)"):
    adapters_lib.parse_clients("9-10", 10)
  with pytest.raises(ValueError, match="'x' is not a client id"):
    adapters_lib.parse_clients("1,x", 10)
