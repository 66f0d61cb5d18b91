"""The aggregator study (configs/study.py, docs/study.md): every method on every seed in every setting.

  python experiments/study.py --workdir=runs/study

Trains what is not finished yet (workdir/<setting>/seed_<s>/<method>, each a train.py workdir; finished runs
are not rerun), writes each setting's compare.md/compare.json and plots, then rewrites the generated part of
docs/study.md (tables, figures, machine, wall time) from them. `--render_only` only re-summarises;
`--settings=synthetic,games` picks settings (the Games one needs `python tools/fetch_data.py games` first);
`--seeds=0,2` and `--stages=1` train only some seeds or the first stages now (the rest on a later call).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fellrec_jax.run import entry  # noqa: E402

if __name__ == "__main__":
  entry.study()
