"""The embedded default: FELLRec on the synthetic Games-like data with a tiny Llama, sized for 2 CPU cores.

  python experiments/train.py --config=configs/default.py --workdir=runs/default
  python experiments/train.py --config=configs/default.py:smoke --workdir=/tmp/smoke   # seconds

Any field can be overridden: `--config.fed.aggregator=fedavg --config.fed.rounds=3`.
"""

import ml_collections

from configs import data as data_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds adapters, client RNG keys, partitions and data order; same seed + config = same numbers

  c.data = data_config.get_data_config()  # data, tokenizer, partition and batch settings (configs/data.py)
  c.data.batch_size = 16  # examples per optimizer step (the reference's 64 is slow on 2 CPU cores)
  c.data.train_on_inputs = False  # loss on the response only: the tiny model's capacity goes to the next item
  c.data.eval_batch_size = 64  # examples per validation step (forward only)

  c.model = ml_collections.ConfigDict()
  c.model.hf_dir = ""  # local Hugging Face Llama checkpoint; "" = a tiny Llama pretrained here on the titles
  c.model.dtype = "float32"  # compute dtype: float32 or bfloat16 (adapters and optimizer stay float32)
  c.model.hidden_size = 128  # tiny model (used when hf_dir is ""): width
  c.model.intermediate_size = 344  # SwiGLU width
  c.model.num_layers = 4  # decoder layers L
  c.model.num_heads = 4  # query heads
  c.model.num_kv_heads = 2  # key/value heads (grouped-query attention)
  c.model.rope_theta = 10000.0  # rotary base
  c.model.max_position_embeddings = 1024  # longest position
  c.model.remat = False  # recompute layer activations in the backward pass (less memory, more FLOPs)
  c.model.loss_chunk = 0  # positions per LM-head/cross-entropy chunk; 0 = all at once
  # PEFT LoRA adapters every client starts from instead of fresh ones (fed.adapter_init): a PEFT directory
  # (adapter_config.json) for all clients, or a directory of client_<c>/ ones (tools/export_adapters.py
  # writes them); their r, alpha and target_modules must match `lora`. "" = fresh adapters.
  c.model.init_adapters = ""

  c.pretrain = ml_collections.ConfigDict()  # in-process pretraining of the tiny base (hf_dir == "")
  c.pretrain.steps = 300  # full-parameter AdamW steps on title lists
  c.pretrain.rows = 16  # sequences per step
  c.pretrain.row_len = 128  # tokens per sequence
  c.pretrain.learning_rate = 3e-3  # peak learning rate (warm-up + cosine)
  c.pretrain.cache_dir = ""  # where the pretrained base is kept and reused; "" = <workdir>/base_model

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 16  # r (reference 8 on a 7B model; the tiny default needs more capacity per layer)
  c.lora.alpha = 16.0  # scale = alpha / r (reference 16)
  c.lora.dropout = 0.05  # dropout on the LoRA input (reference 0.05)
  # Projections with adapters (reference: q_proj, v_proj of a 7B model; on the tiny default that is too
  # little capacity to beat popularity, so every projection is adapted).
  c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

  c.fed = ml_collections.ConfigDict()
  c.fed.num_clients = 5  # clients C (reference 5)
  c.fed.rounds = 5  # communication rounds (reference 75, with early stopping)
  c.fed.local_epochs = 2  # epochs over its data per client per round (reference 5)
  c.fed.aggregator = "fellrec"  # fellrec | fedavg | fedprox | ditto | local | centralized
  c.fed.split_k = 2  # client keeps layers [0, k) and L-1; the server runs [k, L-1) (reference 20 of 32)
  c.fed.adapter_init = "per_client"  # per_client (each client its own random lora_a, as the reference) | shared
  c.fed.server_adapters = "per_client"  # per_client (reference) | shared (one middle-layer set, averaged)
  c.fed.clients_per_chunk = 2  # clients trained at once (vmap lanes, balanced by steps); 0 = all at once
  c.fed.stream_groups = 1  # the clients' tokens as this many independent streams per step
  # Streamed steps run at the smallest of this many token budgets that holds them, planned over the run's
  # steps: fewer padded tokens, one more compiled step per size (1 = every step at the run's largest).
  c.fed.stream_sizes = 4
  c.fed.prox_mu = 0.01  # fedprox: proximal coefficient mu
  c.fed.ditto_lambda = 0.1  # ditto: proximal coefficient of the personal models
  c.fed.min_rounds = 10  # early stopping only after this round (reference: 10)
  c.fed.patience = 5  # stop after this many rounds without a better weighted validation loss (reference 5)
  # Participation and faults (docs/method.md §4). Clients sampled to train each round, without replacement,
  # seeded by (seed, round); the others keep their adapters. 0 = every client, every round (reference).
  c.fed.clients_per_round = 0
  c.fed.dropout_prob = 0.0  # a participant fails to report with this probability (seeded); its work is discarded
  c.fed.max_bad_rounds = 3  # a client non-finite this many rounds in a row is retired (0 = never); none left: stop

  c.fellrec = ml_collections.ConfigDict()  # dynamic balance (docs/method.md §4)
  c.fellrec.alpha = 0.7  # warm-weight scale (reference 0.7)
  c.fellrec.beta = 1.0  # heating speed: w = tanh(alpha / p ** (t + 1/beta)) (reference 1 or 5)
  c.fellrec.temperature = 0.05  # softmax temperature of the losses (reference 0.05)
  c.fellrec.skip_warm_when_beta_is_1 = False  # reference quirk (a): with beta == 1 the code drops w
  c.fellrec.sequential_update = False  # reference quirk (b): update clients in place, one after another
  c.fellrec.heat_apply_to = "aggregation"  # aggregation | aggregation_and_local_lr (also scale local lr by w)

  c.train = ml_collections.ConfigDict()  # local optimizer (the HF Trainer defaults of the reference)
  c.train.learning_rate = 3e-3  # peak AdamW learning rate (reference 1e-4 for a 7B model)
  c.train.warmup_steps = 5  # linear warm-up steps, round 0 only (reference 20, with ~15 steps per client)
  c.train.schedule = "linear"  # linear (decay to 0 within each round, as the reference) | constant
  c.train.weight_decay = 0.0  # AdamW decoupled weight decay
  c.train.max_grad_norm = 1.0  # global-norm clipping; 0 disables
  c.train.fresh_optimizer = True  # a new optimizer state every round (reference) or kept across rounds
  c.train.accum_steps = 1  # gradient accumulation: micro-batches per optimizer step

  c.mesh = ml_collections.ConfigDict()
  c.mesh.clients = 1  # devices along the client axis (client-stacked state and batches); with mesh.model = 1
  # in a multi-process job, 1 means every device of the job (docs/cluster.md)
  c.mesh.model = 1  # devices along the model axis (the frozen base, Megatron-style)

  c.checkpoint_every = 1  # save an Orbax checkpoint every N rounds (and at the end)
  c.max_rounds_per_run = 0  # stop after this many rounds in one invocation (time-limited jobs); re-run resumes
  c.keep_checkpoints = 2  # checkpoints kept on disk

  c.log = ml_collections.ConfigDict()  # experiment trackers (run/tracking.py), besides metrics.jsonl
  c.log.tensorboard = False  # TensorBoard events in <workdir>/tensorboard (needs tensorboardX)
  c.log.wandb_project = ""  # Weights & Biases project to log to; "" = off (needs wandb)
  c.log.wandb_mode = "offline"  # offline (files in <workdir>/wandb; `wandb sync` uploads them) | online
  c.log.client_scalars = 64  # per-client curves for up to this many clients; more: their min/mean/max
  # metrics.jsonl lists per-client rows and the mixing matrix for up to this many clients; beyond, their
  # summaries, and the full arrays in <workdir>/rounds/round_<r>.npz
  c.log.metrics_clients = 100

  c.eval = ml_collections.ConfigDict()  # docs/method.md §5
  c.eval.at_end = True  # evaluate the best adapters on the test split when training ends
  c.eval.every = 0  # also evaluate every N rounds (0 = never)
  # grounding (BIGRec: beam search, then L2 grounding) | likelihood (every title scored; small catalogs)
  # | constrained (beam search over catalog titles). The tiny model's free generation drifts, and the
  # synthetic catalog is small, so the default scores every title.
  c.eval.mode = "likelihood"
  c.eval.num_beams = 4  # beams (reference 4)
  c.eval.max_new_tokens = 128  # generated tokens (reference 128)
  c.eval.batch_size = 32  # prompts per generation batch
  c.eval.max_test_users = 0  # evaluate at most this many test cases per client (0 = all)
  c.eval.ks = (5, 10, 20)  # cut-offs of the metrics

  c.privacy = ml_collections.ConfigDict()  # defences at the split and their measurement (docs/privacy.md)
  c.privacy.boundary_clip = 0.0  # per-token L2 bound of the hidden states sent to the server (0: none)
  c.privacy.boundary_noise = 0.0  # Gaussian noise on them, its norm relative to boundary_clip (0: none)
  c.privacy.dp_clip = 0.0  # DP-SGD: per-example L2 bound of the adapters' gradient (0: DP-SGD off)
  c.privacy.dp_noise = 0.0  # DP-SGD: noise multiplier sigma (noise std = sigma * dp_clip per coordinate)
  c.privacy.delta = 1e-5  # the delta of the (epsilon, delta) that the accountant reports
  # experiments/privacy.py: the defence settings it trains and attacks, besides no defence
  # boundary_clip of the boundary-noise settings; 0 = the median token norm of h_k (undefended run, public text)
  c.privacy.sweep_clip = 0.0
  c.privacy.sweep_noise = (0.25, 1.0)  # boundary_noise of each boundary-noise setting
  c.privacy.sweep_dp_clip = 1.0  # dp_clip of the DP-SGD settings
  c.privacy.sweep_dp_noise = (1.0,)  # dp_noise of each DP-SGD setting
  c.privacy.client = 0  # the client whose private examples are attacked
  c.privacy.public_examples = 512  # the attacker's public examples: random catalog titles in the prompt template
  c.privacy.private_examples = 256  # at most this many of the attacked client's training examples are attacked
  c.privacy.probe_steps = 300  # Adam steps of each attack probe (a linear map; softmax over its classes)
  c.privacy.probe_learning_rate = 1e-2  # the probes' learning rate
  c.privacy.probe_batch = 4096  # feature vectors per probe step

  if arg == "smoke":
    smoke(c)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r} (the only one is 'smoke')")
  return c


def smoke(c: ml_collections.ConfigDict) -> None:
  """Shrink any config to a run of seconds: tiny model, few samples, two rounds, short generation."""
  c.data.max_train_samples = 60
  c.data.max_valid_samples = 30
  c.data.batch_size = 8
  c.data.vocab_size = 400
  c.model.hidden_size = 32
  c.model.intermediate_size = 64
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.pretrain.steps = 10
  c.fed.num_clients = min(c.fed.num_clients, 3)
  c.fed.rounds = 2
  c.fed.local_epochs = 1
  c.fed.split_k = 1
  c.fed.stream_sizes = 1  # one compiled step: in a run of seconds, compiling is most of the time
  c.eval.max_new_tokens = 8
  c.eval.num_beams = 2
  c.eval.max_test_users = 4
