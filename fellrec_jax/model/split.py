"""The flexible storage strategy's split, in one place: which layers and parameters each side holds.

With L decoder layers and split point k, a client holds the token embeddings, layers [0, k), layer L-1,
the final norm and the LM head: the input layers see raw tokens and the output layers see labels, so
both stay private. The server holds layers [k, L-1). Training (front / middle / back), aggregation, FLOP
counting, the client's cost and the communication count all ask this module.
"""

from __future__ import annotations

import numpy as np

def check_split(cfg, k: int) -> None:
  """Raise if k is not a valid split point (0 <= k <= L-1: the last layer always stays on the client)."""
  if not 0 <= k <= cfg.num_layers - 1:
    raise ValueError(
        f"split_k={k} is impossible for a model with num_layers={cfg.num_layers}: the client keeps layers "
        f"[0, k) and layer L-1, so k must be in [0, {cfg.num_layers - 1}]")


def front_layers(cfg, k: int) -> range:
  """The client's layers before the server: [0, k)."""
  return range(0, k)


def server_layers(cfg, k: int) -> range:
  """The server's layers: [k, L-1)."""
  return range(k, cfg.num_layers - 1)


def back_layers(cfg) -> range:
  """The client's layers after the server: the last one."""
  return range(cfg.num_layers - 1, cfg.num_layers)


def client_layers(cfg, k: int) -> tuple[int, ...]:
  return tuple(front_layers(cfg, k)) + tuple(back_layers(cfg))


def num_client_layers(cfg, k: int) -> int:
  return len(client_layers(cfg, k))


def num_server_layers(cfg, k: int) -> int:
  return len(server_layers(cfg, k))


def has_server_layers(cfg, k: int) -> bool:
  """Whether anything crosses the boundary (with k = L-1 the server holds no layer)."""
  return num_server_layers(cfg, k) > 0


def server_layer_mask(cfg, k: int) -> np.ndarray:
  """[L] bool: the layers the server holds."""
  mask = np.zeros(cfg.num_layers, bool)
  mask[list(server_layers(cfg, k))] = True
  return mask


def client_config(cfg, k: int):
  """The client's model as a model of its own: its k+1 layers stacked (layer L-1 at index k)."""
  return cfg.replace(num_layers=num_client_layers(cfg, k))
