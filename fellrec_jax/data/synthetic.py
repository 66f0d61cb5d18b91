"""A synthetic Games-like dataset: the default when no data is given, deterministic by seed.

Catalog: game series (an adjective + a genre noun) with numbered installments released on platforms of
one console family, plus accessories. Users belong to taste groups of Zipf-skewed sizes; a group likes
two genres and one platform family, and has its own sequential habit: how often a user moves to the
next installment of the series just played, or to another game of its genre. Each user gets timestamps
on one global clock, and the interactions go through the same docs/method.md §6 construction as real tables
(prepare.build_dataset: k-core, global temporal split, window, multi-target test).
`baseline_signal` measures what is learnable: item-to-item transitions vs popularity on the test split.
"""

from __future__ import annotations

import math
from typing import Mapping

import ml_collections
import numpy as np
import pandas as pd

from fellrec_jax.data.dataset import Dataset
from fellrec_jax.data.prepare import Construction, build_dataset
from fellrec_jax.data.records import parse_record

GENRE_NOUNS = {
    "Racing": ["Racers", "Rally", "Drift", "Speedway", "Motors"],
    "RPG": ["Saga", "Chronicles", "Quest", "Legends", "Fantasia"],
    "Shooter": ["Strike", "Ops", "Warfare", "Assault", "Squadron"],
    "Sports": ["League", "Soccer", "Hoops", "Slam", "Golf"],
    "Puzzle": ["Puzzle", "Blocks", "Match", "Logic", "Riddles"],
    "Strategy": ["Tactics", "Empire", "Conquest", "Dominion", "Siege"],
    "Adventure": ["Odyssey", "Explorer", "Frontier", "Journey", "Expedition"],
    "Fighting": ["Arena", "Brawl", "Fighters", "Duel", "Fury"],
}
ADJECTIVES = ["Dragon", "Shadow", "Star", "Iron", "Crystal", "Neon", "Thunder", "Mystic", "Galaxy",
              "Pixel", "Storm", "Frost", "Blaze", "Lunar", "Cyber", "Royal", "Savage", "Silent",
              "Turbo", "Wild", "Golden", "Hidden", "Phantom", "Solar", "Crimson", "Ancient"]
# A few names with the punctuation real titles carry (HTML entities, quotes, apostrophes, commas,
# double spaces), so that parsing and the tokenizer are exercised on the default data too.
SPECIAL_SERIES = ["Swords &amp; Sorcery", "Captain's", 'Max "Nitro"', "Heroes, Inc.", "Kart  Kings"]
PLATFORM_FAMILIES = {
    "PlayStation": ["PlayStation 4", "PlayStation 3"],
    "Xbox": ["Xbox One", "Xbox 360"],
    "Nintendo": ["Nintendo Switch", "Wii U", "Nintendo 3DS"],
    "PC": ["PC", "PC [Download]"],
}
ACCESSORIES = ["Wireless Controller", "Charging Dock", "Gaming Headset", "Carrying Case",
               "Memory Card 64GB", "Steering Wheel"]
NUMERALS = ["", " 2", " 3", " 4", " 5"]
EDITIONS = ["", "", "", ": Deluxe Edition", " [Online Game Code]", " - Game of the Year Edition"]


def default_config() -> ml_collections.ConfigDict:
  """The generator's settings; configs/data.py documents each field."""
  return ml_collections.ConfigDict(dict(
      seed=0, num_users=320, num_series=44, max_installments=4, num_groups=6, group_skew=1.5,
      mean_length=18, min_length=8, max_length=40, sequel_prob=(0.75, 0.15), genre_prob=0.5,
      genre_boost=30.0, family_boost=30.0,
      days=720, min_span=0.8, popularity_shape=3.0, k_core=5, window=10))


def generate(config: Mapping | None = None) -> Dataset:
  """The synthetic dataset for `config` (default_config() fields; missing ones take the defaults)."""
  config = _with_defaults(config)
  rng = np.random.default_rng(config.seed)
  items = make_catalog(rng, config)
  interactions = make_interactions(rng, items, config)
  dataset, _ = build_dataset(interactions, items[["item", "title"]],
                             Construction(k_core=config.k_core, window=config.window))
  return dataset


def _with_defaults(config) -> ml_collections.ConfigDict:
  merged = default_config()
  if config is not None:
    overrides = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for key, value in overrides.items():
      if key not in merged:
        raise ValueError(f"data.synthetic.{key}: unknown synthetic setting; known: {sorted(merged)}")
      try:
        merged[key] = value
      except TypeError:  # of another type than the default's
        raise ValueError(f"data.synthetic.{key} must be {_RULES[key][1]}, got {value!r}") from None
  _check_values(merged)
  return merged


# field: (test, what it must be), checked before any data is generated
_RULES = {
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "num_users": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "num_series": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "max_installments": (lambda v: _is_int(v) and 2 <= v <= len(NUMERALS), f"an integer in [2, {len(NUMERALS)}]"),
    "num_groups": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "group_skew": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "mean_length": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "min_length": (lambda v: _is_int(v) and v >= 2, "an integer >= 2 (a history and a target)"),
    "max_length": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    "sequel_prob": (lambda v: isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_prob(p) for p in v),
                    "a pair of probabilities (first group, last group)"),
    "genre_prob": (lambda v: _is_prob(v), "a probability in [0, 1]"),
    "genre_boost": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "family_boost": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "days": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "min_span": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "popularity_shape": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "k_core": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "window": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
}


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_prob(v) -> bool:
  return _is_number(v) and 0 <= v <= 1


def check_config(config: Mapping | None) -> None:
  """Raise ValueError naming the first data.synthetic field that is unknown or whose value is impossible."""
  _with_defaults(config)


def _check_values(config) -> None:
  for field, (ok, what) in _RULES.items():
    if not ok(config[field]):
      raise ValueError(f"data.synthetic.{field} must be {what}, got {config[field]!r}")
  if config.min_length > config.max_length:
    raise ValueError(f"data.synthetic.min_length={config.min_length} is above data.synthetic.max_length="
                     f"{config.max_length}")


def make_catalog(rng: np.random.Generator, config) -> pd.DataFrame:
  """Items: series installments per platform, and accessories per platform."""
  genres = list(GENRE_NOUNS)
  families = list(PLATFORM_FAMILIES)
  names = _series_names(rng, config.num_series, genres)
  rows = []
  for series, (name, genre) in enumerate(names):
    family = families[rng.integers(len(families))]
    platforms = PLATFORM_FAMILIES[family]
    for installment in range(int(rng.integers(2, config.max_installments + 1))):
      edition = EDITIONS[rng.integers(len(EDITIONS))]
      for platform in rng.choice(platforms, size=int(rng.integers(1, 3)), replace=False):
        title = f"{name}{NUMERALS[installment]}{edition} - {platform}"
        rows.append((title, genre, family, series, installment))
  for family, platforms in PLATFORM_FAMILIES.items():
    for accessory in ACCESSORIES:
      rows.append((f"{accessory} for {platforms[0]}", "Accessory", family, -1, 0))
  items = pd.DataFrame(rows, columns=["title", "genre", "family", "series", "installment"])
  items = items.drop_duplicates("title").reset_index(drop=True)
  return items.assign(item=[f"i{n}" for n in range(len(items))])


def _series_names(rng, count: int, genres: list[str]) -> list[tuple[str, str]]:
  names, seen = [], set()
  for n, special in enumerate(SPECIAL_SERIES[:count]):
    genre = genres[n % len(genres)]
    names.append((f"{special} {GENRE_NOUNS[genre][0]}", genre))
    seen.add(names[-1][0])
  while len(names) < count:
    genre = genres[len(names) % len(genres)]
    name = f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]} {GENRE_NOUNS[genre][rng.integers(5)]}"
    if name not in seen:
      seen.add(name)
      names.append((name, genre))
  return names


def make_groups(rng: np.random.Generator, config) -> list[dict]:
  """Taste groups: Zipf-skewed sizes, two liked genres, a platform family, a sequel habit."""
  genres = [g for g in GENRE_NOUNS]
  families = list(PLATFORM_FAMILIES)
  weights = 1.0 / np.arange(1, config.num_groups + 1) ** config.group_skew
  high, low = config.sequel_prob
  groups = []
  for g in range(config.num_groups):
    liked = rng.choice(len(genres), size=2, replace=False)
    groups.append(dict(
        share=weights[g] / weights.sum(), genres={genres[i] for i in liked},
        family=families[g % len(families)],
        sequel_prob=high + (low - high) * g / max(config.num_groups - 1, 1)))
  return groups


def make_interactions(rng: np.random.Generator, items: pd.DataFrame, config) -> pd.DataFrame:
  groups = make_groups(rng, config)
  popularity = rng.pareto(config.popularity_shape, size=len(items)) + 1.0
  next_installment = _next_installments(items)
  group_of_user = rng.choice(len(groups), size=config.num_users, p=[g["share"] for g in groups])
  rows = []
  for user, g in enumerate(group_of_user):
    taste = _taste(items, groups[g], popularity, config)
    length = int(np.clip(rng.poisson(config.mean_length), config.min_length, config.max_length))
    sequence = _sequence(rng, items, taste, next_installment, groups[g]["sequel_prob"],
                         config.genre_prob, length)
    # Users join over the first 60% of the clock and stay active a random share of the rest, so that
    # the global temporal split leaves valid and test items to most users.
    start = rng.uniform(0, 0.6 * config.days)
    span = rng.uniform(config.min_span, 1.0) * (config.days - start)
    times = start + np.sort(rng.uniform(0, span, size=length))
    rows += [(user, items["item"][i], int(t * 86400)) for i, t in zip(sequence, times)]
  return pd.DataFrame(rows, columns=["user", "item", "timestamp"])


def _taste(items: pd.DataFrame, group: dict, popularity: np.ndarray, config) -> np.ndarray:
  liked_genre = items["genre"].isin(group["genres"]).to_numpy()
  own_family = (items["family"] == group["family"]).to_numpy()
  return (popularity * np.where(liked_genre, config.genre_boost, 1.0)
          * np.where(own_family, config.family_boost, 1.0))


def _next_installments(items: pd.DataFrame) -> list[np.ndarray]:
  """For each item, the items of the same series' next installment on the same platform family."""
  key = {(s, n): idx.to_numpy() for (s, n), idx in items.groupby(["series", "installment"]).groups.items()}
  return [key.get((s, n + 1), np.array([], dtype=int)) if s >= 0 else np.array([], dtype=int)
          for s, n in zip(items["series"], items["installment"])]


def _sequence(rng, items, taste, next_installment, sequel_prob, genre_prob, length) -> list[int]:
  """A user's items: sequel of the last game, else a game of its genre, else any liked item."""
  seen = np.zeros(len(items), dtype=bool)
  genre = items["genre"].to_numpy()
  sequence = [_draw(rng, taste, seen)]
  seen[sequence[0]] = True
  while len(sequence) < length:
    last = sequence[-1]
    sequels = [i for i in next_installment[last] if not seen[i]]
    if sequels and rng.random() < sequel_prob:
      item = int(rng.choice(sequels))
    elif rng.random() < genre_prob:
      item = _draw(rng, taste * (genre == genre[last]), seen)
    else:
      item = _draw(rng, taste, seen)
    sequence.append(item)
    seen[item] = True
  return sequence


def _draw(rng, weights: np.ndarray, seen: np.ndarray) -> int:
  weights = np.where(seen, 0.0, weights)
  if weights.sum() <= 0:
    return int(rng.choice(np.flatnonzero(~seen)))
  return int(rng.choice(len(weights), p=weights / weights.sum()))


# ---------------------------------------------------------------- signal: what a model can learn


def baseline_signal(dataset: Dataset, k: int = 10) -> dict[str, dict[str, float]]:
  """Recall@k and NDCG@k on the test split of popularity and of last-item transition counts, both
  fitted on the train+valid histories, both excluding the user's history items (docs/method.md §5)."""
  num_items = len(dataset.catalog)
  popularity = np.zeros(num_items)
  transitions = np.zeros((num_items, num_items))
  for items in dataset.histories.values():
    np.add.at(popularity, list(items), 1.0)
    for a, b in zip(items[:-1], items[1:]):
      transitions[a, b] += 1.0
  tie_break = popularity / (popularity.max() + 1.0)  # popularity orders items with equal counts
  scores = {"popularity": lambda last: popularity,
            "transition": lambda last: transitions[last] + tie_break}
  totals = {name: {"recall": 0.0, "ndcg": 0.0} for name in scores}
  users = 0
  for record in dataset.test:
    parts = parse_record(record)
    truth = set(dataset.item_ids(parts.targets))
    history = list(dataset.histories.get(record.user, ())) or dataset.item_ids(parts.history)
    last = dataset.item_id(parts.history[-1])
    users += 1
    for name, score in scores.items():
      ranked = _top_k(score(last), history, k)
      recall, ndcg = _recall_ndcg(ranked, truth, k)
      totals[name]["recall"] += recall
      totals[name]["ndcg"] += ndcg
  return {name: {m: v / max(users, 1) for m, v in metrics.items()} for name, metrics in totals.items()}


def _top_k(scores: np.ndarray, exclude, k: int) -> np.ndarray:
  scores = scores.astype(float).copy()
  scores[list(exclude)] = -np.inf
  return np.argsort(-scores, kind="stable")[:k]


def _recall_ndcg(ranked, truth: set, k: int) -> tuple[float, float]:
  hits = [rank for rank, item in enumerate(ranked) if item in truth]
  dcg = sum(1.0 / math.log2(rank + 2) for rank in hits)
  idcg = sum(1.0 / math.log2(rank + 2) for rank in range(min(len(truth), k)))
  return len(hits) / len(truth), dcg / idcg
