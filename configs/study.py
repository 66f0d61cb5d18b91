"""The aggregator study (docs/study.md): does FELLRec's dynamic balance give clients more even
recommendation quality than FedAvg at a similar average, and when?

  python experiments/study.py --workdir=runs/study                      # train and evaluate; resumes
  python experiments/study.py --workdir=runs/study --render_only        # docs/study.md's tables again

Everything the study varies is written down here before any run: the settings (data, partition, model
size), the seeds, the methods and FELLRec's alpha/beta grid. Nothing in it is chosen from the study's
results; changing a value here makes it a different study.
"""

import ml_collections

from configs import default
from configs import games

SEEDS = (0, 1, 2, 3, 4)  # each seed: the partition, adapter initialisation, data order and the tiny base
# FELLRec's grid, fixed in advance: alpha 0.7 and beta 1 or 5 are the reference's settings, alpha 0.35 halves
# the warm weight's scale. Every point runs with per-client adapter initialisation (the reference's).
ALPHAS = (0.35, 0.7)
BETAS = (1.0, 5.0)
SHARED_INIT_POINT = (0.7, 1.0)  # the one grid point also run with every client starting from shared adapters
BASELINES = ("fedavg", "fedprox", "ditto", "local", "centralized")
PAIRED_WITH = "fedavg"  # paired differences per seed are taken against this arm


def fellrec_arm(alpha: float, beta: float, adapter_init: str = "per_client") -> tuple[str, dict]:
  """(name, overrides) of one FELLRec point: alpha in hundredths, e.g. ('fellrec_a070_b1', {...}) for 0.7, 1."""
  name = f"fellrec_a{round(alpha * 100):03d}_b{beta:g}" + ("_shared" if adapter_init == "shared" else "")
  return name, {"fed": {"aggregator": "fellrec", "adapter_init": adapter_init},
                "fellrec": {"alpha": alpha, "beta": beta}}


def arms() -> dict[str, dict]:
  """Every method of the study: {name: {config section: {field: value}}} applied to a setting's config;
  FedAvg and FELLRec's reference point first (the order of `methods` and `stages`)."""
  reference = fellrec_arm(*SHARED_INIT_POINT)
  out = {"fedavg": _baseline("fedavg"), reference[0]: reference[1]}
  out.update([fellrec_arm(*SHARED_INIT_POINT, adapter_init="shared")])
  out.update({name: _baseline(name) for name in BASELINES if name != "fedavg"})
  out.update(fellrec_arm(a, b) for a in ALPHAS for b in BETAS if (a, b) != SHARED_INIT_POINT)
  return out


def _baseline(aggregator: str) -> dict:
  return {"fed": {"aggregator": aggregator, "adapter_init": "per_client"}}


def synthetic() -> ml_collections.ConfigDict:
  """The synthetic Games-like data (configs/data.py's defaults): six taste groups of Zipf-skewed sizes, split
  into 5 clients by KMeans over MF user embeddings, so clients differ in size (61 to 22 test users) and in
  taste. The default tiny Llama, on a random 1,024 of the ~1,500 training records."""
  c = default.get_config()
  c.data.partition = "kmeans_mf"  # clients are taste clusters
  c.data.max_train_samples = 1024  # a random 1,024 training records, as the reference samples
  _schedule(c)
  return c


def games_subset() -> ml_collections.ConfigDict:
  """The Games data (configs/games.py, tools/fetch_data.py), cut down: 1,024 training and 1,000 validation
  records, likelihood ranking of the whole catalog for 20 test users per client, the default tiny Llama with
  adapters on every projection and the loss on the response."""
  c = games.get_config()
  c.data.max_valid_samples = 1000  # of the reference's 5,000
  c.data.batch_size = 16
  c.data.train_on_inputs = False  # loss on the response: the small model's capacity goes to the next item
  c.lora.rank = 16
  c.lora.targets = default.get_config().lora.targets  # every projection (q, v only is too little for it)
  c.eval.mode = "likelihood"  # scores every catalog title (generation does not end titles at this size)
  c.eval.max_test_users = 20  # per client
  c.fed.clients_per_chunk = 2
  c.train.warmup_steps = 5
  c.train.learning_rate = 3e-3
  _schedule(c)
  return c


def _schedule(c: ml_collections.ConfigDict) -> None:
  """The study's schedule: configs/default.py's 5 rounds of 2 local epochs, no early stopping, likelihood
  ranking. (A one-seed pilot of 3 rounds left every trained method below the popularity ranking, so the
  schedule was lengthened to the default's before any multi-seed run; nothing else was changed.)"""
  c.fed.rounds = 5
  c.fed.local_epochs = 2
  c.fed.min_rounds = 10  # no early stopping within 5 rounds
  c.eval.mode = "likelihood"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.seeds = SEEDS  # at least 5
  s.arms = arms()  # methods: name -> config overrides (kept sorted by name)
  s.methods = tuple(arms())  # every method, FedAvg and FELLRec's reference point first
  # The order of the runs: each stage runs its methods on every seed (seed by seed) before the next stage, so
  # an interrupted study has whole paired comparisons of the first stages.
  s.stages = (s.methods[:2], s.methods[2:7], s.methods[7:])
  s.shared_init_point = SHARED_INIT_POINT  # (alpha, beta) run with both adapter initialisations
  s.paired_with = PAIRED_WITH  # the arm every other is compared with per seed
  s.settings = ml_collections.ConfigDict()  # name -> the config every arm starts from
  s.settings.synthetic = synthetic()
  s.settings.games = games_subset()
  # The settings a plain `experiments/study.py` trains (the Games one needs data/games: tools/fetch_data.py).
  s.run_settings = ("synthetic",)
  if arg:
    raise ValueError(f"unknown config argument {arg!r} (configs/study.py takes none)")
  return s
