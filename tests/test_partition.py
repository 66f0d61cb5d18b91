"""Partitions: determinism, coverage, KMeans on hand-made points, the table."""

import numpy as np
import pytest

from fellrec_jax.data import partition
from fellrec_jax.data import synthetic
from fellrec_jax.data.dataset import Dataset
from fellrec_jax.data.records import INPUT_END, make_record


@pytest.fixture(scope="module")
def dataset():
  return synthetic.generate()


def test_kmeans_mf_is_deterministic_and_assigns_every_user(dataset):
  first = partition.partition_users(dataset, "kmeans_mf", 5, seed=0)
  again = partition.partition_users(dataset, "kmeans_mf", 5, seed=0)
  assert first == again
  assert sorted(first) == list(dataset.users)
  sizes = np.bincount(list(first.values()))
  assert len(sizes) == 5 and sizes.min() > 0
  assert list(sizes) == sorted(sizes, reverse=True)  # clients numbered by size, largest first
  # The taste groups have skewed sizes: the clients do too (docs: 93/90/66/40/31 users).
  assert sizes.max() / sizes.min() >= 2


def test_kmeans_mf_clients_differ_in_behaviour(dataset):
  """Clients see different parts of the catalog: their top items overlap little."""
  client_of_user = partition.partition_users(dataset, "kmeans_mf", 5, seed=0)
  tops = []
  for client in range(5):
    counts = np.zeros(len(dataset.catalog))
    for user, items in dataset.histories.items():
      if client_of_user[user] == client:
        np.add.at(counts, list(items), 1)
    tops.append(set(np.argsort(-counts, kind="stable")[:20]))
  overlaps = [len(tops[a] & tops[b]) for a in range(5) for b in range(a + 1, 5)]
  assert min(overlaps) <= 5


def test_kmeans_separates_three_blobs_and_orders_by_size():
  rng = np.random.default_rng(0)
  centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  sizes = [5, 20, 10]
  points = np.concatenate([c + 0.1 * rng.normal(size=(n, 2)) for c, n in zip(centres, sizes)])
  labels = partition.kmeans(points, 3, seed=3)
  # Largest blob (20 points, second) is cluster 0, then the 10-point blob, then the 5-point one.
  assert labels.tolist() == [2] * 5 + [0] * 20 + [1] * 10
  assert partition.kmeans(points, 3, seed=4).tolist() == labels.tolist()


def test_an_empty_cluster_takes_the_farthest_point_of_a_shared_cluster():
  labels = np.array([0, 0, 1, 1, 0])
  distances = np.zeros((5, 3))
  distances[np.arange(5), labels] = [0.1, 0.5, 0.2, 0.9, 0.3]
  # Cluster 2 is empty: point 3 is the farthest from its centroid (cluster 1 keeps point 2).
  assert partition._fill_empty_clusters(labels, distances, 3).tolist() == [0, 0, 1, 2, 0]
  # A point alone in its cluster is never moved, even if it is the farthest.
  labels = np.array([0, 0, 1])
  distances = np.array([[0.2, 0, 0], [0.1, 0, 0], [0, 5.0, 0]])
  assert partition._fill_empty_clusters(labels, distances, 3).tolist() == [2, 0, 1]


def test_kmeans_with_repeated_points_fills_every_cluster():
  points = np.array([[0.0], [0.0], [0.0], [1.0], [1.0], [5.0]])
  labels = partition.kmeans(points, 3, seed=0)
  assert sorted(np.bincount(labels).tolist()) == [1, 2, 3]
  assert labels.tolist() == [0, 0, 0, 1, 1, 2]


def test_kmeans_needs_k_distinct_points():
  with pytest.raises(ValueError, match="at least 3 distinct points"):
    partition.kmeans(np.array([[1.0], [1.0], [2.0]]), 3, seed=0)


def test_random_partition_is_balanced_and_deterministic(dataset):
  first = partition.partition_users(dataset, "random", 7, seed=1)
  assert first == partition.partition_users(dataset, "random", 7, seed=1)
  assert first != partition.partition_users(dataset, "random", 7, seed=2)
  sizes = np.bincount(list(first.values()))
  assert sizes.max() - sizes.min() <= 1 and sizes.sum() == len(dataset.users)


def test_dirichlet_partition_is_skewed_and_covers_every_client(dataset):
  labels = partition.partition_users(dataset, "dirichlet", 5, seed=0, dirichlet_alpha=0.1,
                                     mf_steps=50)
  assert labels == partition.partition_users(dataset, "dirichlet", 5, seed=0, dirichlet_alpha=0.1,
                                             mf_steps=50)
  assert sorted(labels) == list(dataset.users)
  assert np.bincount(list(labels.values())).min() > 0


def test_dirichlet_labels_fill_empty_clients():
  labels = partition.dirichlet_labels(np.zeros(10, int), 4, alpha=0.01, seed=0)
  assert np.bincount(labels, minlength=4).min() >= 1


def test_per_user_makes_one_client_per_user(dataset):
  users = dataset.users
  clients = partition.partition_users(dataset, "per_user", len(users), seed=0)
  assert [clients[u] for u in users] == list(range(len(users)))


def test_partition_table_counts_by_hand():
  def record(user):
    return make_record("i", "p:", ["A"], INPUT_END, ["B"], user)
  dataset = Dataset(train=(record(1), record(1), record(2)), valid=(record(3),),
                    test=(record(1), record(3)), catalog=("A", "B"), histories={})
  table = partition.partition_table(dataset, {1: 0, 2: 1, 3: 1})
  assert table.splitlines() == [
      "  client   users   train   valid    test",
      "       0       1       2       0       1",
      "       1       2       1       1       1",
      "   total       3       3       1       2",
  ]
