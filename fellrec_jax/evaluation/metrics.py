"""Top-K ranking metrics (docs/method.md §5.3), the per-client report with its balance (§5.4), and the popularity baseline.

All-rank evaluation: `ranked` holds every user's top items over the whole catalog (history excluded
upstream), item id -1 meaning "no item" (never a hit). Per user with ground truth GT and K:
  HR@K        = 1 if any of the top K is in GT, else 0 (hit ratio; equals Recall@K when |GT| = 1)
  Precision@K = hits / K          Recall@K = hits / |GT|
  NDCG@K      = sum over hits at rank r < K of 1/log2(r+2), divided by the same sum over the first
                min(|GT|, K) ranks (binary gain)
  MRR@K       = 1/(r+1) for the first hit at rank r < K, else 0.
Users with empty ground truth are skipped; the metrics are means over the remaining users. Reports and
tables list the reference's cut-offs (@10, @20) first.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from fellrec_jax.evaluation import topk as topk_lib

METRICS = ("hr", "recall", "ndcg", "precision", "mrr")
DEFAULT_KS = (5, 10, 20)
LEAD_KS = (10, 20)  # the reference's cut-offs: first in eval.json and in tables
DISPLAY = {"hr": "HR", "recall": "Recall", "ndcg": "NDCG", "precision": "Precision", "mrr": "MRR"}


def ordered_ks(ks: Sequence[int]) -> tuple[int, ...]:
  """The cut-offs in report order: 10 and 20 first (those present), then the others as given."""
  ks = tuple(dict.fromkeys(int(k) for k in ks))
  return tuple(k for k in LEAD_KS if k in ks) + tuple(k for k in ks if k not in LEAD_KS)


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
  """Keys of `topk_metrics`, e.g. "hr@10": cut-off-major in `ordered_ks` order, then METRICS' order."""
  return [f"{metric}@{k}" for k in ordered_ks(ks) for metric in METRICS]


def display_name(name: str) -> str:
  """"hr@10" -> "HR@10", as papers write it."""
  metric, _, k = name.partition("@")
  return f"{DISPLAY.get(metric, metric)}@{k}" if k else DISPLAY.get(metric, metric)


def topk_metrics(ranked, ground_truth: Sequence[Sequence[int]], ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """HR, Recall, NDCG, Precision and MRR at every K, averaged over users with non-empty ground truth.

  Args:
    ranked: int [N, Kmax] item ids, best first (-1 = no item); Kmax >= max(ks). An item repeated in a row
      counts at its first rank only.
    ground_truth: N lists of relevant item ids (several for a multi-target user; may be empty).
    ks: cut-offs.
  Returns:
    {"hr@K", "recall@K", "ndcg@K", "precision@K", "mrr@K" for every K in ks: float}, in `metric_names` order.
  Raises:
    ValueError: on a shape or length mismatch, Kmax < max(ks), an id below -1, or when no user has
      ground truth.
  """
  per_user = per_user_metrics(ranked, ground_truth, ks)
  return {name: float(np.mean(values)) for name, values in per_user.items()}


def per_user_metrics(ranked, ground_truth: Sequence[Sequence[int]],
                     ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
  """The metrics of every user with non-empty ground truth: {name: float64 [M]}."""
  ranked, ks = _check_inputs(ranked, ground_truth, ks)
  truth = [np.unique(np.asarray(items, np.int64)) for items in ground_truth]
  negative = [n for n, items in enumerate(truth) if items.size and items[0] < 0]
  if negative:
    raise ValueError(f"ground truth of user {negative[0]} holds a negative item id: {truth[negative[0]].tolist()}")
  sizes = np.array([len(items) for items in truth])
  keep = sizes > 0
  if not keep.any():
    raise ValueError(f"none of the {len(truth)} users has ground truth: the metrics are undefined")
  hits_NxK = _hits(ranked[keep], [items for items, k in zip(truth, keep) if k])
  sizes = sizes[keep]
  discount = 1.0 / np.log2(np.arange(ranked.shape[1]) + 2.0)
  out = {}
  for k in ks:
    hits = hits_NxK[:, :k]
    num_hits = hits.sum(axis=1)
    ideal = np.cumsum(discount[:k])[np.minimum(sizes, k) - 1]
    first = np.argmax(hits, axis=1)
    out[f"hr@{k}"] = (num_hits > 0).astype(np.float64)
    out[f"precision@{k}"] = num_hits / k
    out[f"recall@{k}"] = num_hits / sizes
    out[f"ndcg@{k}"] = (hits * discount[:k]).sum(axis=1) / ideal
    out[f"mrr@{k}"] = np.where(hits.any(axis=1), 1.0 / (first + 1.0), 0.0)
  return {name: out[name] for name in metric_names(ks)}


def _check_inputs(ranked, ground_truth, ks) -> tuple[np.ndarray, tuple[int, ...]]:
  ranked = np.asarray(ranked)
  if ranked.ndim != 2:
    raise ValueError(f"ranked must be [num_users, Kmax] item ids, got shape {ranked.shape}")
  if ranked.size and not np.issubdtype(ranked.dtype, np.integer):
    raise ValueError(f"ranked must hold integer item ids, got dtype {ranked.dtype}")
  ranked = ranked.astype(np.int64)
  if ranked.size and ranked.min() < topk_lib.NO_ITEM:
    raise ValueError(f"ranked holds item id {ranked.min()}: ids are >= 0, or -1 for no item")
  if len(ground_truth) != ranked.shape[0]:
    raise ValueError(f"ranked has {ranked.shape[0]} rows but ground_truth has {len(ground_truth)} users")
  ks = tuple(int(k) for k in ks)
  if not ks or min(ks) < 1:
    raise ValueError(f"ks must be positive cut-offs, got {ks}")
  if ranked.shape[1] < max(ks):
    raise ValueError(f"ranked has Kmax={ranked.shape[1]} columns, fewer than max(ks)={max(ks)}: rank deeper")
  return ranked, ks


def _hits(ranked_NxK: np.ndarray, truth: Sequence[np.ndarray]) -> np.ndarray:
  """bool [N, K]: ranked[n, r] is in truth[n] and not already ranked higher (one vectorised isin over
  (user, item) keys)."""
  num_items = 1 + max(int(ranked_NxK.max(initial=0)), max(int(t.max()) for t in truth))
  users = np.arange(ranked_NxK.shape[0], dtype=np.int64)
  truth_keys = np.concatenate([n * num_items + t for n, t in zip(users, truth)])
  keys = users[:, None] * num_items + ranked_NxK
  return np.isin(keys, truth_keys) & (ranked_NxK >= 0) & _first_occurrence(ranked_NxK)


def _first_occurrence(ranked_NxK: np.ndarray) -> np.ndarray:
  """bool [N, K]: the item does not appear earlier in its row (a repeated item can only hit once)."""
  order = np.argsort(ranked_NxK, axis=1, kind="stable")
  sorted_items = np.take_along_axis(ranked_NxK, order, axis=1)
  repeat = np.zeros_like(sorted_items, dtype=bool)
  repeat[:, 1:] = sorted_items[:, 1:] == sorted_items[:, :-1]
  first = np.empty_like(repeat)
  np.put_along_axis(first, order, ~repeat, axis=1)
  return first


# ----------------------------------------------------------------------------------------------------
# The per-client report


def client_report(per_client_metrics: Sequence[Mapping[str, float]], num_test_users: Sequence[int],
                  client_ids: Sequence[int] | None = None) -> dict:
  """The three parts of eval.json from each client's metrics.

  Args:
    per_client_metrics: one `topk_metrics` dict per client (same keys).
    num_test_users: the test users each client's metrics average over (> 0): the weights of `overall`.
    client_ids: the client of each entry (default 0..C-1).
  Returns:
    {"overall": {metric: mean weighted by num_test_users},
     "clients": [{"client": id, "num_test_users": n, metric: value, ...}, ...],
     "balance": {metric: {"std", "min", "max", "max_over_min"}}}
    std is the population std (ddof=0) over clients, unweighted; max_over_min is None (JSON null) when
    min is 0, where the ratio is undefined.
  """
  if len(per_client_metrics) != len(num_test_users) or not per_client_metrics:
    raise ValueError(f"need one user count per client and at least one client: got "
                     f"{len(per_client_metrics)} metric dicts and {len(num_test_users)} counts")
  counts = np.asarray(num_test_users, np.float64)
  if (counts <= 0).any():
    raise ValueError(f"every client needs test users (drop clients without): counts {list(num_test_users)}")
  client_ids = list(range(len(counts))) if client_ids is None else [int(c) for c in client_ids]
  names = list(per_client_metrics[0])
  for client, metrics in zip(client_ids, per_client_metrics):
    if list(metrics) != names:
      raise ValueError(f"client {client} has metrics {list(metrics)}, client {client_ids[0]} has {names}")
  values_CxM = np.array([[metrics[name] for name in names] for metrics in per_client_metrics], np.float64)
  overall = counts @ values_CxM / counts.sum()
  clients = [{"client": client, "num_test_users": int(n), **{name: float(v) for name, v in zip(names, row)}}
             for client, n, row in zip(client_ids, num_test_users, values_CxM)]
  return {"overall": {name: float(v) for name, v in zip(names, overall)},
          "clients": clients,
          "balance": {name: balance(values_CxM[:, m]) for m, name in enumerate(names)}}


def balance(values) -> dict:
  """Spread of one metric across clients: population std, min, max, max/min (None when min is 0)."""
  values = np.asarray(values, np.float64)
  low, high = float(values.min()), float(values.max())
  return {"std": float(values.std()), "min": low, "max": high,
          "max_over_min": high / low if low > 0 else None}


# ----------------------------------------------------------------------------------------------------
# The popularity baseline


def item_counts(item_lists: Sequence[Sequence[int]], num_items: int) -> np.ndarray:
  """int64 [num_items]: how often each item occurs in the lists (e.g. every training interaction)."""
  flat = np.concatenate([np.asarray(items, np.int64) for items in item_lists] + [np.zeros(0, np.int64)])
  if flat.size and (flat.min() < 0 or flat.max() >= num_items):
    raise ValueError(f"item ids must be in [0, {num_items}), got {flat.min()}..{flat.max()}")
  return np.bincount(flat, minlength=num_items)


def popularity_ranking(counts, exclude: Sequence[Sequence[int]], k: int) -> np.ndarray:
  """int64 [N, k]: the most frequent items (ties: lower id first), each user's excluded items removed.

  counts: [num_items] training frequency (see `item_counts`); exclude: per user the items never to rank
  (the train+valid history). Rows run out with -1 when fewer than k items remain.
  """
  counts = np.asarray(counts)
  order = np.lexsort((np.arange(len(counts)), -counts))  # by count descending, then id
  exclude = topk_lib.pad_item_lists(exclude)
  # A user's top k survive among the first k + |history| items of the global order.
  candidates = order[:k + exclude.shape[1]]
  width = len(candidates)
  users = np.arange(exclude.shape[0], dtype=np.int64)[:, None]
  excluded_keys = (users * len(counts) + exclude)[exclude >= 0]
  removed = np.isin(users * len(counts) + candidates[None, :], excluded_keys)
  keep_first = np.argsort(removed, axis=1, kind="stable")[:, :k]
  ranked = np.where(np.take_along_axis(removed, keep_first, axis=1), topk_lib.NO_ITEM, candidates[keep_first])
  if width < k:
    ranked = np.pad(ranked, ((0, 0), (0, k - width)), constant_values=topk_lib.NO_ITEM)
  return ranked.astype(np.int64)


def markdown_table(reports: Mapping[str, Mapping], metrics: Sequence[str] = ("recall@10", "ndcg@10")) -> str:
  """Methods side by side: per metric the overall value and its spread across clients (min, max, std)."""
  header = ["method"] + [f"{m} {part}" for m in metrics for part in ("overall", "min", "max", "std")]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for method, report in reports.items():
    cells = [method]
    for m in metrics:
      spread = report["balance"][m]
      cells += [f"{report['overall'][m]:.4f}", f"{spread['min']:.4f}", f"{spread['max']:.4f}", f"{spread['std']:.4f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def report_metrics(report: Mapping) -> list[str]:
  """An eval.json report's metrics in table order: cut-offs 10 and 20 first, HR, Recall, NDCG, ... each."""
  names = list(report["overall"])
  ks = [int(name.partition("@")[2]) for name in names if "@" in name]
  ordered = [name for name in metric_names(ks) if name in report["overall"]]
  return ordered + [name for name in names if name not in ordered]


def markdown_report(report: Mapping, model: str = "model") -> str:
  """eval.json as a Markdown table to paste: the model overall, the popularity baseline, then each client."""
  names = report_metrics(report)
  rows = [(f"{model} (overall, {sum(c['num_test_users'] for c in report['clients'])} users)", report["overall"])]
  popularity = report.get("baselines", {}).get("popularity")
  if popularity:
    rows.append(("popularity (overall)", popularity["overall"]))
  rows += [(f"client {c['client']} ({c['num_test_users']} users)", c) for c in report["clients"]]
  header = [""] + [display_name(name) for name in names]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join([label] + [f"{values[name]:.4f}" for name in names]) + " |" for label, values in rows]
  return "\n".join(lines) + "\n"


def text_table(report: Mapping) -> str:
  """eval.json as a plain table, one metric a row: overall, popularity and the spread across clients."""
  names = report_metrics(report)
  popularity = report.get("baselines", {}).get("popularity", {}).get("overall", {})
  width = max(len(display_name(name)) for name in names)
  lines = [f"{'':<{width}} {'overall':>8} {'popular':>8} {'min':>8} {'max':>8} {'std':>8}"]
  for name in names:
    spread = report["balance"][name]
    pop = f"{popularity[name]:8.4f}" if name in popularity else f"{'-':>8}"
    lines.append(f"{display_name(name):<{width}} {report['overall'][name]:8.4f} {pop} {spread['min']:8.4f} "
                 f"{spread['max']:8.4f} {spread['std']:8.4f}")
  return "\n".join(lines)
