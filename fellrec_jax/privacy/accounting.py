"""The privacy cost of DP-SGD on a client's adapters: epsilon for a given delta, from Google's
`dp-accounting` library (an optional dependency: `pip install fellrec-jax[privacy]` or `dp-accounting`).

Each optimizer step is modelled as a Poisson-subsampled Gaussian mechanism with sampling rate
q = batch size / client examples and noise multiplier sigma, composed over every step the client takes in
the run, and accounted with Renyi DP (the accountant TF Privacy and Opacus report). Our batches are
shuffled epochs of fixed size, not Poisson samples: the usual approximation, stated in docs/privacy.md.
"""

from __future__ import annotations

import math

RDP_ORDERS = tuple([1.0 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512])


def _library():
  try:
    import dp_accounting
  except ImportError as error:
    raise ImportError("privacy accounting needs the dp-accounting package: pip install dp-accounting") from error
  return dp_accounting


def dp_sgd_event(noise_multiplier: float, sample_rate: float, steps: int):
  """The dp_accounting event of `steps` Poisson-subsampled Gaussian steps."""
  dp = _library()
  if noise_multiplier <= 0:
    raise ValueError(f"a noise multiplier must be > 0 to give a finite epsilon, got {noise_multiplier}")
  if not 0 < sample_rate <= 1:
    raise ValueError(f"the sampling rate must be in (0, 1], got {sample_rate}")
  step = dp.PoissonSampledDpEvent(sample_rate, dp.GaussianDpEvent(noise_multiplier))
  return dp.SelfComposedDpEvent(step, int(steps))


def dp_sgd_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
  """Epsilon of DP-SGD at `delta` (Renyi DP accountant); inf without noise."""
  if noise_multiplier <= 0:
    return math.inf
  if steps <= 0:
    return 0.0
  dp = _library()
  accountant = dp.rdp.RdpAccountant(list(RDP_ORDERS))
  accountant.compose(dp_sgd_event(noise_multiplier, sample_rate, steps))
  return float(accountant.get_epsilon(delta))


def client_epsilons(noise_multiplier: float, examples, batch_size: int, steps, delta: float) -> list[float]:
  """Each client's epsilon: its sampling rate batch/examples and its steps over the run."""
  return [dp_sgd_epsilon(noise_multiplier, min(1.0, batch_size / max(int(n), 1)), int(s), delta)
          for n, s in zip(examples, steps)]
