"""FID as the field computes it (Heusel et al. 2017; mseitzer/pytorch-fid): pool3 features of the FID Inception,
Gaussian statistics accumulated in float64 on the host, the Fréchet distance with scipy's sqrtm.

Conventions, each with its test in tests/test_evaluate.py:
* features: pytorch-fid's port of the 2015 TF Inception (`models/inception.py`), float32, input
  pixels mapped x / 127.5 - 1 as pytorch-fid does;
* resize to 299: 'clean' is clean-fid's (PIL bicubic with antialias, per channel in float, no
  re-quantisation); 'legacy' is pytorch-fid's (bilinear, half-pixel centres, no antialias);
* images enter as uint8, so generated images are quantised exactly as a saved PNG would be;
* statistics: mean and covariance with ddof = 1 (np.cov), summed exactly across processes;
* `.npz` files hold `mu` and `sigma`, the format of pytorch-fid and clean-fid.
"""

import dataclasses
import os

import jax
import numpy as np
import scipy.linalg
from PIL import Image

from wurst_jax import sharding
from wurst_jax.evaluate import gather

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
RESIZE_MODES = ('clean', 'legacy')


def _check_uint8_images(images: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f'FID takes uint8 RGB images [N, H, W, 3] (quantised as a PNG would be), got {images.dtype} {images.shape}'
        )


def resize_for_inception(images: np.ndarray, mode: str = 'clean') -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, 299, 299, 3] in [0, 255]."""
    _check_uint8_images(images)
    if mode == 'clean':
        size = (INCEPTION_SIZE, INCEPTION_SIZE)
        channels = [
            np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode='F').resize(size, resample=Image.BICUBIC))
            for image in images
            for c in range(3)
        ]
        out = np.stack(channels).reshape(len(images), 3, *size).transpose(0, 2, 3, 1)
        return np.clip(out, 0, 255).astype(np.float32)
    if mode == 'legacy':
        shape = (len(images), INCEPTION_SIZE, INCEPTION_SIZE, 3)
        return np.asarray(jax.image.resize(images.astype(np.float32), shape, 'linear', antialias=False))
    raise ValueError(f'unknown FID resize {mode!r}: use one of {RESIZE_MODES}')


class InceptionFeatures:
    """uint8 images -> pool3 features, jitted in float32 and sharded over this process's devices."""

    def __init__(self, module, variables, *, resize: str = 'clean', batch_size: int = 64):
        if resize not in RESIZE_MODES:
            raise ValueError(f'unknown FID resize {resize!r}: use one of {RESIZE_MODES}')
        self.resize = resize
        self.batch_size, replicated, self.batch = sharding.local_inference(batch_size)
        self.variables = jax.device_put(variables, replicated)
        self._apply = jax.jit(lambda v, x: module.apply(v, x / 127.5 - 1.0))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = resize_for_inception(images[start : start + self.batch_size], self.resize)
            padded = np.zeros((self.batch_size, *chunk.shape[1:]), np.float32)
            padded[: len(chunk)] = chunk
            out.append(np.asarray(self._apply(self.variables, jax.device_put(padded, self.batch)))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)


@dataclasses.dataclass
class GaussianStats:
    """Streaming sums for mean and covariance, in float64 on the host."""

    count: int = 0
    total: np.ndarray | None = None  # Σ x, [D]
    outer: np.ndarray | None = None  # Σ x xᵀ, [D, D]

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f'features must be [N, D], got {x.shape}')
        if self.total is None:
            self.total, self.outer = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
        elif x.shape[1] != self.total.shape[0]:
            raise ValueError(f'features of dimension {x.shape[1]} added to statistics of {self.total.shape[0]}')
        self.count += len(x)
        self.total += x.sum(0)
        self.outer += x.T @ x

    def all_processes(self) -> 'GaussianStats':
        """The sums over every process's statistics, identical on all processes."""
        if self.total is None:
            raise ValueError('no features were added to the statistics')
        packed = np.concatenate([[self.count], self.total, self.outer.reshape(-1)])
        summed = gather.allgather_float64(packed).sum(0)
        d = self.total.shape[0]
        return GaussianStats(int(summed[0]), summed[1 : d + 1], summed[d + 1 :].reshape(d, d))

    def mean_and_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f'a covariance needs at least 2 samples, got {self.count}')
        mu = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, sigma


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f'statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs '
            f'{sigma2.shape}; both sets need features of the same network and dimension'
        )
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # a near-singular product: regularise both covariances
        offset = np.eye(len(mu1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # rounding can leave a small imaginary part
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f'sqrtm has a large imaginary component ({np.abs(covmean.imag).max():.3g}): '
                'the covariances are far from positive semi-definite; use more samples'
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def save_stats(path: str, mu: np.ndarray, sigma: np.ndarray, **extra: np.ndarray) -> None:
    """An .npz with `mu` and `sigma` (what pytorch-fid and clean-fid read), plus optional arrays."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma, **extra)


def load_stats(path: str, dim: int = FEATURE_DIM) -> dict[str, np.ndarray]:
    """The arrays of a statistics .npz, checked to hold `mu` [dim] and `sigma` [dim, dim]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'reference statistics {path} not found: make them with '
            'python -m wurst_jax.evaluate.reference_stats --images=... --out=FILE.npz'
        )
    with np.load(path) as f:
        stats = dict(f)
    if 'mu' not in stats or 'sigma' not in stats:
        raise ValueError(f'{path} holds {sorted(stats)}, not the FID statistics mu and sigma')
    if stats['mu'].shape != (dim,) or stats['sigma'].shape != (dim, dim):
        raise ValueError(
            f'{path} has mu {stats["mu"].shape} and sigma {stats["sigma"].shape}; FID with Inception '
            f'pool3 needs ({dim},) and ({dim}, {dim}): were they made with another feature layer?'
        )
    return stats
