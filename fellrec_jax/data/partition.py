"""Users to clients (docs/method.md §2): KMeans over MF user embeddings, random, Dirichlet skew, one per user.

Every method returns {user: client} over `dataset.users` (users with a record in any split), clients
numbered 0..C-1, each with at least one user. All are deterministic given the seed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fellrec_jax.data.dataset import SPLITS, Dataset
from fellrec_jax.data.records import parse_record

METHODS = ("kmeans_mf", "random", "dirichlet", "per_user")


def partition_users(dataset: Dataset, method: str, num_clients: int, seed: int, *,
                    mf_dim: int = 32, mf_steps: int = 300, mf_learning_rate: float = 0.05,
                    mf_l2: float = 1e-4, kmeans_iters: int = 100, dirichlet_alpha: float = 0.5,
                    num_item_groups: int = 0) -> dict[int, int]:
  """{user: client} for every user of the dataset."""
  users = dataset.users
  if method not in METHODS:
    raise ValueError(f"unknown partition {method!r}; expected one of {METHODS}")
  if num_clients < 1 and not (method == "per_user" and num_clients == 0):
    raise ValueError(f"num_clients must be >= 1 (0 only with per_user), got {num_clients}")
  if num_clients > len(users):
    raise ValueError(f"{num_clients} clients but only {len(users)} users: every client needs a user")
  if method == "per_user":
    if num_clients not in (0, len(users)):
      raise ValueError(f"per_user makes one client per user: set num_clients = {len(users)} "
                       f"(the number of users) or 0, got {num_clients}")
    return {user: client for client, user in enumerate(users)}
  if method == "random":
    labels = random_labels(len(users), num_clients, seed)
  else:
    user_emb, item_emb = train_mf(*interaction_pairs(dataset), num_users=len(users),
                                  num_items=len(dataset.catalog), dim=mf_dim, steps=mf_steps,
                                  learning_rate=mf_learning_rate, l2=mf_l2, seed=seed)
    if method == "kmeans_mf":
      labels = kmeans(user_emb, num_clients, seed=seed, iters=kmeans_iters)
    else:
      item_groups = kmeans(item_emb, num_item_groups or num_clients, seed=seed, iters=kmeans_iters)
      labels = dirichlet_labels(dominant_groups(dataset, item_groups), num_clients, dirichlet_alpha,
                                seed)
  return {user: int(label) for user, label in zip(users, labels)}


def interaction_pairs(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
  """(user index, item id) pairs: each user's train+valid history, the MF training interactions.

  A user without a stored history (none in derived BIGRec dirs, by construction) falls back to the
  titles of its records' inputs.
  """
  users, items = [], []
  for index, user in enumerate(dataset.users):
    history = dataset.histories.get(user) or _input_items(dataset, user)
    users += [index] * len(history)
    items += list(history)
  return np.asarray(users, np.int32), np.asarray(items, np.int32)


def _input_items(dataset: Dataset, user: int) -> list[int]:
  titles = {t: None for name in SPLITS for r in dataset.split(name) if r.user == user
            for t in parse_record(r).history}
  return dataset.item_ids(list(titles))


def train_mf(user_index: np.ndarray, item_index: np.ndarray, *, num_users: int, num_items: int,
             dim: int, steps: int, learning_rate: float, l2: float,
             seed: int) -> tuple[np.ndarray, np.ndarray]:
  """BPR matrix factorisation (one uniform negative per positive, full batch, Adam) in JAX."""
  key_init, key_steps = jax.random.split(jax.random.PRNGKey(seed))
  ku, ki = jax.random.split(key_init)
  params = {"user": 0.1 * jax.random.normal(ku, (num_users, dim)),
            "item": 0.1 * jax.random.normal(ki, (num_items, dim))}
  params = _fit_mf(params, jnp.asarray(user_index), jnp.asarray(item_index), key_steps, steps=steps,
                   learning_rate=learning_rate, l2=l2, num_items=num_items)
  return np.asarray(params["user"], np.float64), np.asarray(params["item"], np.float64)


@functools.partial(jax.jit, static_argnames=("steps", "learning_rate", "l2", "num_items"))
def _fit_mf(params, users_P, positives_P, key, *, steps, learning_rate, l2, num_items):
  optimizer = optax.adam(learning_rate)

  def loss_fn(params, negatives_P):
    u_PxD = params["user"][users_P]
    pos_PxD = params["item"][positives_P]
    neg_PxD = params["item"][negatives_P]
    margin_P = jnp.sum(u_PxD * (pos_PxD - neg_PxD), axis=-1)
    penalty = jnp.mean(jnp.sum(u_PxD**2 + pos_PxD**2 + neg_PxD**2, axis=-1))
    return jnp.mean(jax.nn.softplus(-margin_P)) + l2 * penalty

  def step(carry, step_key):
    params, opt_state = carry
    negatives_P = jax.random.randint(step_key, positives_P.shape, 0, num_items)
    grads = jax.grad(loss_fn)(params, negatives_P)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  carry = (params, optimizer.init(params))
  (params, _), _ = jax.lax.scan(step, carry, jax.random.split(key, steps))
  return params


def kmeans(points: np.ndarray, k: int, *, seed: int, iters: int = 100) -> np.ndarray:
  """Lloyd's KMeans with k-means++ init (float64 numpy, deterministic by seed).

  An empty cluster is re-seeded with the point farthest from its centroid; if points are too few
  distinct to fill k clusters, a ValueError says so. Labels are renumbered by cluster size, largest
  first (ties: lowest original label).
  """
  points = np.asarray(points, np.float64)
  if len(np.unique(points, axis=0)) < k:
    raise ValueError(f"KMeans with k={k} needs at least {k} distinct points, got "
                     f"{len(np.unique(points, axis=0))}")
  rng = np.random.default_rng(seed)
  centroids = _kmeans_plus_plus(points, k, rng)
  labels = np.full(len(points), -1)
  for _ in range(iters):
    distances = _squared_distances(points, centroids)
    new_labels = np.argmin(distances, axis=1)
    new_labels = _fill_empty_clusters(new_labels, distances, k)
    if np.array_equal(new_labels, labels):
      break
    labels = new_labels
    centroids = np.stack([points[labels == c].mean(axis=0) for c in range(k)])
  sizes = np.bincount(labels, minlength=k)
  order = np.lexsort((np.arange(k), -sizes))
  return np.argsort(order)[labels]


def _kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  centroids = [points[rng.integers(len(points))]]
  for _ in range(1, k):
    d2 = _squared_distances(points, np.stack(centroids)).min(axis=1)
    centroids.append(points[rng.choice(len(points), p=d2 / d2.sum())])
  return np.stack(centroids)


def _fill_empty_clusters(labels: np.ndarray, distances: np.ndarray, k: int) -> np.ndarray:
  labels = labels.copy()
  for cluster in range(k):
    if np.any(labels == cluster):
      continue
    sizes = np.bincount(labels, minlength=k)
    own = distances[np.arange(len(labels)), labels]
    own = np.where(sizes[labels] > 1, own, -1.0)  # never empty another cluster
    labels[int(np.argmax(own))] = cluster
  return labels


def _squared_distances(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  return ((points[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=-1)


def random_labels(num_users: int, num_clients: int, seed: int) -> np.ndarray:
  """A random permutation cut into num_clients near-equal parts."""
  labels = np.arange(num_users) % num_clients
  return np.random.default_rng(seed).permutation(labels)


def dominant_groups(dataset: Dataset, item_groups: np.ndarray) -> np.ndarray:
  """Per user (dataset.users order): the item group most of its history items fall in."""
  user_index, item_index = interaction_pairs(dataset)
  counts = np.zeros((len(dataset.users), item_groups.max() + 1), np.int64)
  np.add.at(counts, (user_index, item_groups[item_index]), 1)
  return np.argmax(counts, axis=1)


def dirichlet_labels(groups: np.ndarray, num_clients: int, alpha: float, seed: int) -> np.ndarray:
  """Non-IID split: the users of each group are spread over clients in Dirichlet(alpha) proportions
  (small alpha: each client sees few groups). Clients left empty take one user from the largest."""
  if alpha <= 0:
    raise ValueError(f"dirichlet_alpha must be > 0, got {alpha}")
  rng = np.random.default_rng(seed)
  labels = np.zeros(len(groups), np.int64)
  for group in np.unique(groups):
    members = rng.permutation(np.flatnonzero(groups == group))
    shares = rng.dirichlet(np.full(num_clients, alpha))
    cuts = np.round(np.cumsum(shares)[:-1] * len(members)).astype(int)
    for client, part in enumerate(np.split(members, cuts)):
      labels[part] = client
  for client in range(num_clients):
    if not np.any(labels == client):
      largest = int(np.argmax(np.bincount(labels, minlength=num_clients)))
      labels[np.flatnonzero(labels == largest)[-1]] = client
  return labels


def partition_table(dataset: Dataset, client_of_user: dict[int, int], max_rows: int = 40) -> str:
  """Per client: users and train/valid/test samples, with totals (a summary beyond max_rows clients)."""
  num_clients = max(client_of_user.values()) + 1
  counts = np.zeros((num_clients, 4), np.int64)
  for client in client_of_user.values():
    counts[client, 0] += 1
  for column, name in enumerate(SPLITS, start=1):
    for record in dataset.split(name):
      counts[client_of_user[record.user], column] += 1
  row = lambda name, values: f"{name:>8} " + " ".join(f"{v:>7}" for v in values)
  lines = [f"{'client':>8} {'users':>7} {'train':>7} {'valid':>7} {'test':>7}"]
  shown = range(num_clients) if num_clients <= max_rows else range(max_rows // 2)
  lines += [row(c, counts[c]) for c in shown]
  if num_clients > max_rows:  # thousands of clients: the first ones, then the spread
    lines.append(f"{'...':>8} ({num_clients - len(shown)} more clients)")
    for name, stat in (("min", np.min), ("median", np.median), ("max", np.max)):
      lines.append(row(name, [int(v) for v in stat(counts, axis=0)]))
  lines.append(row("total", counts.sum(axis=0)))
  return "\n".join(lines)
