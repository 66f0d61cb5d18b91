"""The privacy report of experiments/privacy.py: attack accuracy at every split point, and attack accuracy
beside recommendation accuracy for each defence setting (docs/privacy.md).

Each setting (no defence, boundary noise at each `privacy.sweep_noise` with the clip `privacy.sweep_clip`
or, when that is 0, the median token norm of the undefended run's public states at the split, DP-SGD at
each `privacy.sweep_dp_noise`) is a run of its own in <workdir>/<setting> (trained unless it has finished: a
rerun reuses it), all from one pretrained base. The attacks target the `privacy.client` client's best
adapters: over every split point k = 0..L-1 for the undefended run, at the run's `fed.split_k` for each
setting. Writes <workdir>/privacy.json, privacy.md and privacy_by_layer.png.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import jax
import numpy as np
from matplotlib.figure import Figure

from fellrec_jax import files
from fellrec_jax.data import pipeline
from fellrec_jax.federated import sharding
from fellrec_jax.model import split as split_lib
from fellrec_jax.privacy import accounting
from fellrec_jax.privacy import attacks
from fellrec_jax.privacy import defences as defences_lib
from fellrec_jax.privacy import probe as probe_lib
from fellrec_jax.run import checkpoint
from fellrec_jax.run import setup as setup_lib
from fellrec_jax.run import state as state_lib
from fellrec_jax.run import train as train_lib

logger = logging.getLogger("fellrec_jax")

ATTACKS = ("token_nearest", "token_learned", "history_precision", "target_top1", "gradient_label_token",
           "gradient_target_top1")
RECOMMENDATION = ("hr@10", "ndcg@10")


def settings(config, clip: float) -> list[tuple[str, dict]]:
  """(name, privacy overrides) of every defended setting the report trains; `clip`: the boundary clip."""
  p = config.privacy
  out = [(f"noise_{s:g}", {"boundary_clip": clip, "boundary_noise": s}) for s in p.sweep_noise]
  out += [(f"dpsgd_{s:g}", {"dp_clip": p.sweep_dp_clip, "dp_noise": s}) for s in p.sweep_dp_noise]
  return out


def setting_config(config, workdir: Path, overrides: dict):
  c = copy.deepcopy(config)
  for key, value in overrides.items():
    c.privacy[key] = value
  if not c.model.hf_dir and not c.pretrain.cache_dir:
    c.pretrain.cache_dir = str(workdir / "base_model")  # one pretrained base for every setting
  return c


def trained(config, workdir: Path) -> tuple[setup_lib.Run, dict, dict]:
  """(run, summary, best adapters) of a finished run, training it first unless it finished before."""
  summary_path = workdir / "summary.json"
  if not (summary_path.exists() and "eval" in json.loads(summary_path.read_text())):
    train_lib.train(config, workdir)
  run = setup_lib.setup(config, workdir)
  mngr = checkpoint.manager(workdir / "checkpoints", config.keep_checkpoints)
  restored = checkpoint.restore(mngr, state_lib.checkpointable(state_lib.init_state(run)))
  if restored is None:
    raise FileNotFoundError(f"{workdir / 'checkpoints'}: no checkpoint of the finished run")
  return run, json.loads(summary_path.read_text()), sharding.to_host(restored[1]["best_adapters"])


class Target:
  """The attacked client's examples (private) and the attacker's (public), encoded."""

  def __init__(self, run: setup_lib.Run, client: int):
    p, data = run.config.privacy, run.data
    records = pipeline.records_by_client(data.dataset.train, data.client_of_user, data.num_clients)[client]
    rng = np.random.default_rng(run.config.seed)
    chosen = rng.permutation(len(records))[:p.private_examples]
    encode = lambda rs: attacks.encode(data.tokenizer, data.dataset, rs, prefix_len=len(data.prefix_ids),
                                       cutoff_len=data.cutoff_len, train_on_inputs=run.config.data.train_on_inputs,
                                       pad_id=data.pad_id)
    self.private = encode([records[i] for i in chosen])
    self.public = encode(attacks.public_records(data.dataset, records, p.public_examples, run.config.seed + 1))
    self.num_items = len(data.dataset.catalog)


def probe_config(config) -> probe_lib.ProbeConfig:
  p = config.privacy
  return probe_lib.ProbeConfig(p.probe_steps, p.probe_learning_rate, p.probe_batch, config.seed)


def attack_split(run, adapters, target: Target, k: int, d: defences_lib.Defences, gradient: dict) -> dict:
  """Every boundary attack on h_k (after the boundary defence `d`), with the gradient's results."""
  cfg, lcfg, pc = run.model_cfg, run.lcfg, probe_config(run.config)
  states = lambda ex, seed: attacks.released(attacks.boundary_states(run.base, adapters, ex, cfg, lcfg, k), d, seed)
  pub, priv = states(target.public, 1), states(target.private, 2)
  embedding = run.base["embed_tokens"]["embedding"]
  row = {"k": k, "crosses": split_lib.has_server_layers(cfg, k)}
  row.update(attacks.token_recovery(pub, target.public, priv, target.private, embedding, cfg.vocab_size, pc))
  row.update(attacks.item_recovery(pub, target.public, priv, target.private, target.num_items, pc))
  row.update(gradient)
  return row


def gradient_attacks(run, adapters, target: Target) -> dict:
  grad = lambda ex: attacks.boundary_gradient(run.base, adapters, ex, run.model_cfg, run.lcfg)
  return attacks.label_leakage(grad(target.public), target.public, grad(target.private), target.private,
                               run.model_cfg.vocab_size, target.num_items, probe_config(run.config))


def epsilon(run, summary: dict) -> dict | None:
  """The DP-SGD accountant's epsilon (attacked client and worst client) at privacy.delta, or None."""
  d = run.lc.split.defences
  if not d.dp_sgd:
    return None
  steps = run.train_plan.client_steps * summary["rounds_done"]
  eps = accounting.client_epsilons(d.dp_noise, run.train_plan.num_examples, run.train_plan.batch_size, steps,
                                   run.config.privacy.delta)
  return {"client": eps[run.config.privacy.client], "max": max(eps), "delta": run.config.privacy.delta}


def median_norm(run, adapters, target: Target) -> float:
  """The median L2 norm of the public examples' states at the run's split point."""
  states = attacks.boundary_states(run.base, adapters, target.public, run.model_cfg, run.lcfg, run.config.fed.split_k)
  return float(np.median(np.linalg.norm(states[target.public.valid], axis=-1)))


def privacy_report(config, workdir) -> dict:
  """Train (or reuse) every setting's run, attack it, and write privacy.json / .md / _by_layer.png."""
  workdir = Path(workdir)
  client = config.privacy.client
  report = {"client": client, "split_k": config.fed.split_k, "by_layer": [], "settings": []}
  todo = [("none", {})]
  while todo:
    name, overrides = todo.pop(0)
    run, summary, best = trained(setting_config(config, workdir, overrides), workdir / name)
    adapters = jax.tree.map(lambda x: x[client], best)
    target = Target(run, client)
    gradient = gradient_attacks(run, adapters, target)
    d = run.lc.split.defences
    if name == "none":
      report["by_layer"] = [attack_split(run, adapters, target, k, d, gradient)
                            for k in range(run.model_cfg.num_layers)]
      at_split = report["by_layer"][config.fed.split_k]
      report["boundary_clip"] = config.privacy.sweep_clip or median_norm(run, adapters, target)
      todo = settings(config, report["boundary_clip"])
    else:
      at_split = attack_split(run, adapters, target, config.fed.split_k, d, gradient)
    recommendation = {m: summary["eval"].get(m) for m in RECOMMENDATION}
    report["settings"].append({"setting": name, **overrides, **at_split, **recommendation,
                               "epsilon": epsilon(run, summary)})
    report["public_examples"], report["private_examples"] = len(target.public.tokens), len(target.private.tokens)
    write(report, workdir)  # after each setting: a long sweep's finished settings are on disk
  print(markdown(report))
  return report


def write(report: dict, workdir: Path) -> None:
  files.write_json(workdir / "privacy.json", report)  # atomic, as every JSON output of a run
  files.write_text(workdir / "privacy.md", markdown(report))
  plot_by_layer(report, workdir / "privacy_by_layer.png")


def _cell(value) -> str:
  return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
  """The two tables: attacks by split point, and attacks beside recommendation by defence setting."""
  head = ["k", "crosses"] + list(ATTACKS) + ["history_chance", "target_chance"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(_cell(row[h]) for h in head) + " |" for row in report["by_layer"]]
  head = ["setting"] + list(ATTACKS) + list(RECOMMENDATION) + ["epsilon"]
  lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for row in report["settings"]:
    eps = row["epsilon"]
    cells = [row["setting"]] + [_cell(row[h]) for h in list(ATTACKS) + list(RECOMMENDATION)]
    cells.append("-" if eps is None else f"{eps['client']:.2f} (max {eps['max']:.2f}, delta {eps['delta']:g})")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_by_layer(report: dict, path) -> Path:
  """Each attack's accuracy against the split point k."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  fig = Figure(figsize=(7, 4.2))
  ax = fig.add_subplot()
  ks = [row["k"] for row in report["by_layer"]]
  for name in ATTACKS:
    ax.plot(ks, [row[name] for row in report["by_layer"]], marker="o", label=name)
  ax.plot(ks, [row["target_chance"] for row in report["by_layer"]], ls=":", color="gray", label="target chance")
  ax.set_xlabel("split point k (the server receives the hidden states after layer k)")
  ax.set_ylabel("attack accuracy on private examples")
  ax.set_xticks(ks)
  ax.set_ylim(-0.02, 1.02)
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  FigureCanvasAgg(fig).print_png(str(path))
  return Path(path)
