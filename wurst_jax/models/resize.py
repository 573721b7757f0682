"""Resizes that reproduce torch.nn.functional.interpolate exactly, as separable matrices.

jax.image.resize uses half-pixel centres and, for cubic, a = -0.75 without antialiasing, so it
differs from what the Würstchen/Stable Cascade networks were trained with: bicubic with antialias
and align_corners (dome272/Wuerstchen `modules.py` `DiffNeXt`), bilinear with align_corners
(Stability-AI/StableCascade `modules/stage_b.py`).
Sizes are static, so the matrices are built with NumPy at trace time and applied as two einsums.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic kernel; torch's antialiased path uses a = -0.5 (the plain path -0.75)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=None)
def bicubic_antialias_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's bicubic resize with antialias=True, align_corners=True."""
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    support = 2.0 * max(scale, 1.0)
    inv = 1.0 / max(scale, 1.0)  # when downsampling, the kernel is stretched to low-pass the input
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        j = np.arange(lo, hi)
        w = _cubic((j - center + 0.5) * inv)
        m[i, lo:hi] = w / w.sum()
    return m.astype(np.float32)


@functools.lru_cache(maxsize=None)
def bilinear_align_corners_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's bilinear resize with align_corners=True (no antialiasing)."""
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = scale * np.arange(out_size)
    lo = np.minimum(np.floor(src).astype(int), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), lo), 1 - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return m.astype(np.float32)


_MATRICES = {'bicubic_antialias': bicubic_antialias_matrix, 'bilinear': bilinear_align_corners_matrix}


def resize(x: jax.Array, size: tuple[int, int], method: str = 'bicubic_antialias') -> jax.Array:
    """[B, H, W, C] -> [B, size[0], size[1], C] in float32, as torch's align_corners=True resize."""
    rows = jnp.asarray(_MATRICES[method](x.shape[1], size[0]))
    cols = jnp.asarray(_MATRICES[method](x.shape[2], size[1]))
    x = jnp.einsum('oh,bhwc->bowc', rows, x.astype(jnp.float32), precision='highest')
    return jnp.einsum('pw,bowc->bopc', cols, x, precision='highest')
