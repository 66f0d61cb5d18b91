"""The `data` part of a run's config (the engine sets `config.data = get_data_config()`).

fed.num_clients, fed.local_epochs and seed live outside `data` and are passed to
fellrec_jax.data.pipeline.build_federated_data as arguments. Override on the command line with
`--config.data.batch_size=16` etc.
"""

import ml_collections


def get_synthetic_config() -> ml_collections.ConfigDict:
  """The default dataset when `data.path` is empty (fellrec_jax/data/synthetic.py)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # generator seed: fixed apart from the run's seed, so runs compare on the same data
  c.num_users = 320  # users before the k-core (about 1,500 train / 570 valid / 210 test samples)
  c.num_series = 44  # game series; each has 2..max_installments installments on 1-2 platforms
  c.max_installments = 4  # most installments (numbered 1..4) per series
  c.num_groups = 6  # taste groups (liked genres, platform family, sequel habit)
  c.group_skew = 1.5  # group sizes follow 1/rank**group_skew (client size imbalance)
  c.mean_length = 18  # mean interactions per user (Poisson), before the k-core
  c.min_length = 8  # shortest user sequence
  c.max_length = 40  # longest user sequence
  c.sequel_prob = (0.75, 0.15)  # P(next installment of the last series), first to last group
  c.genre_prob = 0.5  # otherwise, P(another game of the last game's genre)
  c.genre_boost = 30.0  # taste weight of the group's liked genres (vs 1)
  c.family_boost = 30.0  # taste weight of the group's platform family (vs 1)
  c.days = 720  # length of the global clock; users join in the first 60%
  c.min_span = 0.8  # a user stays active for U(min_span, 1) of the remaining time
  c.popularity_shape = 3.0  # Pareto shape of item popularity (smaller: more skewed)
  c.k_core = 5  # docs/method.md §6 k-core applied to the generated interactions
  c.window = 10  # docs/method.md §6 history window
  return c


def get_data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Source.
  c.path = ""  # dataset directory (docs/data.md) or plain BIGRec dir; "" = generate the synthetic default
  c.synthetic = get_synthetic_config()  # used only when path == ""
  c.max_train_samples = 0  # 0 = all train records; the reference trains on a random 1,024
  c.max_valid_samples = 0  # 0 = all valid records; the reference validates on a random 5,000
  # Tokenizer and prompts.
  c.tokenizer_path = ""  # local HF tokenizer directory; "" = train a byte-level BPE (saved in workdir/tokenizer)
  c.vocab_size = 2000  # most tokens of the trained BPE (smaller if the corpus runs out of merges)
  c.cutoff_len = 512  # most tokens per example (the reference's); oldest history titles are dropped to fit
  c.train_on_inputs = True  # loss on the whole prompt (reference) or, if False, on the response + EOS only
  c.train_template = "clean"  # training examples' template: clean (the one used everywhere) | reference (the
  # reference's training template: indented lines, a trailing space; it differs from its inference one)
  c.truncation = "history"  # an example over cutoff_len: drop its oldest history titles (history) | cut it at
  # cutoff_len tokens as the reference's tokenizer call does (end: may cut the response and its EOS)
  # Batches (docs/data.md, "Batches").
  c.share_prefix = True  # compute the prompt prefix common to all examples once (P tokens); False: P = 0
  c.row_len = 0  # T, tokens per packed row; 0 = longest suffix rounded up to a multiple of 16
  c.batch_size = 64  # examples per optimizer step (the reference's 64; 16 suits the CPU default run)
  c.eval_batch_size = 0  # examples per validation step; 0 = batch_size
  # Clients (docs/method.md §2).
  c.partition = "kmeans_mf"  # kmeans_mf | random | dirichlet | per_user
  c.dirichlet_alpha = 0.5  # dirichlet: concentration (smaller = each client sees fewer item groups)
  c.num_item_groups = 0  # dirichlet: item groups (KMeans on MF item embeddings); 0 = num_clients
  c.mf_dim = 32  # kmeans_mf/dirichlet: MF embedding size
  c.mf_steps = 300  # full-batch BPR steps (Adam)
  c.mf_learning_rate = 0.05  # Adam learning rate of the MF
  c.mf_l2 = 1e-4  # L2 penalty on the embeddings in the BPR loss
  c.kmeans_iters = 100  # most Lloyd iterations (stops earlier when assignments settle)
  return c
