"""Image grids for TensorBoard and PNG files."""

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] (any array) -> uint8, rounded to the nearest level."""
    return np.round((np.clip(np.asarray(images, np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int = 4, pad: int = 2) -> np.ndarray:
    """images [N, H, W, 3] in [-1, 1] -> one uint8 grid [rows*(H+pad)+pad, ncols*(W+pad)+pad, 3]."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    rows = -(-n // ncols)
    grid = np.full((rows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(to_uint8(images)):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    return grid


def save_png(path: str, grid: np.ndarray) -> None:
    Image.fromarray(grid).save(path)
