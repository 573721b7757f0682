"""Exact cross-process gathers for evaluation: float64 host arrays travel bit for bit.

JAX runs without x64, so a float64 array would be cast to float32 on its way through a
collective; viewed as uint32 pairs it arrives unchanged, and sums over processes are then done
on the host in process order, the same on every process.
"""

import jax
import numpy as np
from jax.experimental import multihost_utils


def allgather_float64(x: np.ndarray) -> np.ndarray:
    """[process_count, *x.shape] float64: every process's `x` (same shape on all)."""
    x = np.ascontiguousarray(x, np.float64)
    if jax.process_count() == 1:
        return x[None]
    words = multihost_utils.process_allgather(x.view(np.uint32))
    return np.ascontiguousarray(np.asarray(words)).view(np.float64).reshape(jax.process_count(), *x.shape)


def allgather_rows(x: np.ndarray) -> np.ndarray:
    """Every process's rows of `x` [n_p, ...] (n_p may differ), concatenated in process order; for
    dtypes JAX carries without x64 (float32 embeddings, uint8 images), not float64."""
    if jax.process_count() == 1:
        return x
    counts = multihost_utils.process_allgather(np.int32(len(x)))
    padded = np.zeros((int(counts.max()), *x.shape[1:]), x.dtype)
    padded[: len(x)] = x
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([rows[p, :n] for p, n in enumerate(counts)])
