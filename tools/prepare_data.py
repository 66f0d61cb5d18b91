r"""Builds a dataset directory (docs/data.md) from interaction/item tables or raw Amazon 2018 files.

  python tools/prepare_data.py --interactions ratings.csv --items movies.csv --out data/movies \
      --user_col userId --item_col movieId --items_item_col movieId --title_col title \
      --instruction "Given a list of movies the user has watched before, please recommend a new movie that the user likes to the user." \
      --input_phrase "The user has watched the following movies before:"
  python tools/prepare_data.py --amazon_reviews Video_Games_5.json.gz \
      --amazon_meta meta_Video_Games.json.gz --out data/games

Installed, the same program is `fellrec-prepare-data` (fellrec_jax/run/entry.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fellrec_jax.run.entry import prepare_data as main  # noqa: E402

if __name__ == "__main__":
  sys.exit(main())
