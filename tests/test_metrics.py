"""Top-K metrics, the per-client report and the popularity baseline against hand-computed values."""

import json

import numpy as np
import pytest

from fellrec_jax.evaluation import metrics

D2, D3 = 1 / np.log2(3), 1 / np.log2(4)  # NDCG discounts of ranks 2 and 3 (1-based); rank 1 has 1


@pytest.fixture
def toy():
  ranked = np.array([
      [10, 11, 12, 13],  # A: GT {11, 13}: hits at rank 2 and rank 4 = K+1 for K=3
      [20, 21, 22, 23],  # B: GT {22}: a hit exactly at rank K=3
      [40, 41, 42, 43],  # C: empty GT, skipped
      [30, -1, -1, -1],  # D: GT of 5 items (more than K), one hit at rank 1, the rest of the row empty
  ])
  truth = [[13, 11], [22], [], [30, 31, 32, 33, 34]]
  return ranked, truth


def test_topk_metrics_hand_computed(toy):
  ranked, truth = toy
  got = metrics.topk_metrics(ranked, truth, ks=(2, 3))
  ndcg_a = D2 / (1 + D2)  # one hit at rank 2; IDCG over min(2, K) = 2 ranks
  expected = {
      "precision@2": (1 / 2 + 0 + 1 / 2) / 3,
      "precision@3": (1 / 3 + 1 / 3 + 1 / 3) / 3,
      "recall@2": (1 / 2 + 0 + 1 / 5) / 3,
      "recall@3": (1 / 2 + 1 + 1 / 5) / 3,
      "ndcg@2": (ndcg_a + 0 + 1 / (1 + D2)) / 3,
      "ndcg@3": (ndcg_a + D3 / 1 + 1 / (1 + D2 + D3)) / 3,
      "mrr@2": (1 / 2 + 0 + 1) / 3,
      "mrr@3": (1 / 2 + 1 / 3 + 1) / 3,
      "hr@2": (1 + 0 + 1) / 3,  # A and D have a hit in their top 2, B not
      "hr@3": (1 + 1 + 1) / 3,
  }
  assert sorted(got) == sorted(expected)
  for name, value in expected.items():
    assert got[name] == pytest.approx(value, abs=1e-12), name
  assert got["ndcg@2"] == pytest.approx(1 / 3)  # ndcg_a + 1/(1+D2) = 1: a check on the arithmetic above


def test_default_keys_and_perfect_ranking():
  ranked = np.arange(40).reshape(2, 20)
  got = metrics.topk_metrics(ranked, [[0], [20, 21]])
  assert list(got) == [f"{m}@{k}" for k in (10, 20, 5) for m in ("hr", "recall", "ndcg", "precision", "mrr")]
  assert got["recall@5"] == got["ndcg@5"] == got["mrr@20"] == 1.0
  assert got["precision@5"] == pytest.approx((1 / 5 + 2 / 5) / 2)


def test_input_errors(toy):
  ranked, truth = toy
  with pytest.raises(ValueError, match="fewer than max"):
    metrics.topk_metrics(ranked, truth, ks=(5,))
  with pytest.raises(ValueError, match="3 users"):
    metrics.topk_metrics(ranked, truth[:3], ks=(2,))
  with pytest.raises(ValueError, match="-1 for no item"):
    metrics.topk_metrics(np.array([[1, -2]]), [[1]], ks=(2,))
  with pytest.raises(ValueError, match="none of the"):
    metrics.topk_metrics(ranked[2:3], [[]], ks=(2,))
  with pytest.raises(ValueError, match="integer"):
    metrics.topk_metrics(ranked.astype(float), truth, ks=(2,))


def test_client_report_hand_computed():
  per_client = [{"recall@10": 0.1, "ndcg@10": 0.0}, {"recall@10": 0.3, "ndcg@10": 0.5},
                {"recall@10": 0.2, "ndcg@10": 0.25}]
  report = metrics.client_report(per_client, [10, 30, 60])
  assert report["overall"]["recall@10"] == pytest.approx((0.1 * 10 + 0.3 * 30 + 0.2 * 60) / 100)  # 0.22
  assert report["overall"]["ndcg@10"] == pytest.approx(0.3)
  assert report["balance"]["recall@10"] == pytest.approx(
      {"std": np.sqrt((0.01 + 0.01 + 0) / 3), "min": 0.1, "max": 0.3, "max_over_min": 3.0})
  assert report["balance"]["ndcg@10"]["std"] == pytest.approx(np.sqrt((0.0625 + 0.0625) / 3))
  assert report["balance"]["ndcg@10"]["max_over_min"] is None  # min 0: the ratio is undefined
  assert report["clients"][1] == {"client": 1, "num_test_users": 30, "recall@10": 0.3, "ndcg@10": 0.5}
  json.dumps(report, allow_nan=False)  # eval.json stays strict JSON
  with pytest.raises(ValueError, match="test users"):
    metrics.client_report(per_client, [10, 0, 60])


def test_popularity_ranking_excludes_history():
  counts = metrics.item_counts([[1, 2, 0], [1, 2, 1, 2, 5], [0, 1, 2, 3, 5, 5]], 6)
  np.testing.assert_array_equal(counts, [2, 4, 4, 1, 0, 3])
  ranked = metrics.popularity_ranking(counts, [[2], [1, 0, 5, 3], []], k=3)
  np.testing.assert_array_equal(ranked, [[1, 5, 0], [2, 4, -1], [1, 2, 5]])


def test_markdown_table():
  report = metrics.client_report([{"recall@10": 0.1}, {"recall@10": 0.3}], [1, 3])
  table = metrics.markdown_table({"fellrec": report}, ["recall@10"])
  assert table.splitlines()[0] == "| method | recall@10 overall | recall@10 min | recall@10 max | recall@10 std |"
  assert table.splitlines()[2] == "| fellrec | 0.2500 | 0.1000 | 0.3000 | 0.1000 |"


def test_a_repeated_item_hits_once():
  got = metrics.topk_metrics(np.array([[7, 7, 8, 7]]), [[7, 8]], ks=(3,))
  assert got["precision@3"] == pytest.approx(2 / 3)  # 7 at rank 1, 8 at rank 3; the second 7 is no hit
  assert got["recall@3"] == 1.0
  assert got["ndcg@3"] == pytest.approx((1 + D3) / (1 + D2))


def test_hit_ratio_hand_computed():
  ranked = np.array([
      [5, 6, 7, 8],  # GT {6}: single target, hit at rank 2
      [1, 2, 3, 4],  # GT {3, 4, 9}: two hits at ranks 3 and 4
      [9, 8, 7, 6],  # GT {0}: no hit
      [2, 2, 2, 2],  # GT {2}: one hit, the repeats count once
  ])
  truth = [[6], [9, 3, 4], [0], [2]]
  got = metrics.topk_metrics(ranked, truth, ks=(1, 2, 3, 4))
  assert [got[f"hr@{k}"] for k in (1, 2, 3, 4)] == pytest.approx([1 / 4, 2 / 4, 3 / 4, 3 / 4])
  assert got["recall@4"] == pytest.approx((1 + 2 / 3 + 0 + 1) / 4)  # HR counts users, recall items
  single = [0, 2, 3]  # single-target users: HR@K equals Recall@K
  one = metrics.topk_metrics(ranked[single], [truth[n] for n in single], ks=(1, 2, 3, 4))
  for k in (1, 2, 3, 4):
    assert one[f"hr@{k}"] == one[f"recall@{k}"]


def test_report_order_puts_the_reference_cut_offs_first():
  assert metrics.ordered_ks((5, 10, 20)) == (10, 20, 5)
  assert metrics.ordered_ks((1, 20, 3, 20)) == (20, 1, 3)
  assert metrics.metric_names((20, 5))[:3] == ["hr@20", "recall@20", "ndcg@20"]
  assert metrics.display_name("hr@10") == "HR@10" and metrics.display_name("ndcg@5") == "NDCG@5"


def _eval_report():
  names = metrics.metric_names((5, 10))
  clients = [{name: 0.5 for name in names}, {name: 0.25 for name in names}]
  report = metrics.client_report(clients, [1, 3], [0, 4])
  report["baselines"] = {"popularity": metrics.client_report([{name: 0.125 for name in names}], [4])}
  return report


def test_markdown_report_rows_and_columns():
  lines = metrics.markdown_report(_eval_report(), model="FELLRec").splitlines()
  assert lines[0].startswith("|  | HR@10 | Recall@10 | NDCG@10 | Precision@10 | MRR@10 | HR@5 |")
  assert lines[1] == "|" + "---|" * 11
  assert lines[2] == "| FELLRec (overall, 4 users) | " + " | ".join(["0.3125"] * 10) + " |"  # (0.5 + 3 * 0.25) / 4
  assert lines[3] == "| popularity (overall) | " + " | ".join(["0.1250"] * 10) + " |"
  assert lines[4].startswith("| client 0 (1 users) | 0.5000 |")
  assert lines[5].startswith("| client 4 (3 users) | 0.2500 |")
  assert len(lines) == 6


def test_text_table_one_metric_a_row():
  lines = metrics.text_table(_eval_report()).splitlines()
  assert lines[0].split() == ["overall", "popular", "min", "max", "std"]
  assert lines[1].split() == ["HR@10", "0.3125", "0.1250", "0.2500", "0.5000", "0.1250"]
  assert [line.split()[0] for line in lines[1:]][5:7] == ["HR@5", "Recall@5"]
