"""CLIP score and CMMD from a local Hugging Face CLIP folder (CLIP score: Hessel et al. 2021; CMMD:
Jayasumana et al., "Rethinking FID", arXiv:2401.09603).

CLIP score conventions (`clip_score`), all over pairs (image i, prompt i):
* 'torchmetrics': 100 · cos per pair, then the mean clamped at 0 (torchmetrics' CLIPScore);
* 'hessel': 2.5 · max(cos, 0) per pair, then the mean (Hessel et al. 2021);
* 'cosine': the mean raw cosine (MLPerf / maxdiffusion).
CMMD: the biased MMD² with a Gaussian kernel of σ = 10 between L2-normalised CLIP image embeddings,
× 1000 (Jayasumana et al. 2024; the paper's network is ViT-L/14 at 336 px).
Preprocessing (`preprocess`), PIL bicubic, then [0, 1] and CLIP's mean and std, in one of two orders:
* 'clip' (CLIP score): shorter side resized to the network's size, then centre-cropped, as transformers'
  CLIPImageProcessor (PIL backend) does;
* 'cmmd': centre-cropped to a square, then resized, as CMMD's reference code does (google-research
  `cmmd/io_util.py`). The two agree exactly on square images.
"""

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from wurst_jax import sharding
from wurst_jax.convert.core import (
    CONFIG_NAME,
    TRANSFORMERS_WEIGHTS,
    read_json,
    read_safetensors,
    variables_from_state_dict,
)
from wurst_jax.models.clip import CLIPTextModel, CLIPVisionModel
from wurst_jax.tokenizer import create_tokenizer

CONVENTIONS = ('torchmetrics', 'hessel', 'cosine')
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def clip_score(cosines: np.ndarray, convention: str = 'torchmetrics') -> float:
    """One CLIP score from the per-pair cosine similarities."""
    cosines = np.asarray(cosines, np.float64)
    if convention == 'torchmetrics':
        return float(max(100.0 * cosines.mean(), 0.0))
    if convention == 'hessel':
        return float(np.mean(2.5 * np.maximum(cosines, 0.0)))
    if convention == 'cosine':
        return float(cosines.mean())
    raise ValueError(f'unknown CLIP score convention {convention!r}: use one of {CONVENTIONS}')


@jax.jit
def _mmd2(x: jax.Array, y: jax.Array, sigma: float) -> jax.Array:
    def mean_kernel(a, b):
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
        return jnp.mean(jnp.exp(-sq / (2 * sigma**2)))

    return mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y)


def cmmd(x: np.ndarray, y: np.ndarray, sigma: float = 10.0, scale: float = 1000.0) -> float:
    """scale · MMD²(x, y) of two sets of embeddings [N, D], [M, D] (the biased estimator)."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f'CMMD needs two sets of embeddings of one dimension, got {x.shape} and {y.shape}')
    return float(scale * _mmd2(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), sigma))


PREPROCESSING = ('clip', 'cmmd')


def _resize_then_crop(image: np.ndarray, size: int) -> np.ndarray:
    """CLIPImageProcessor: the shorter side to `size` (the longer one rounded down), then the centre square."""
    h, w = image.shape[:2]
    long = int(size * max(h, w) / min(h, w))
    new_h, new_w = (long, size) if w <= h else (size, long)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]


def _crop_then_resize(image: np.ndarray, size: int) -> np.ndarray:
    """CMMD's io_util: the centre square, then resized to `size`."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = Image.fromarray(image[top : top + s, left : left + s])
    return np.asarray(square.resize((size, size), resample=Image.BICUBIC))


def preprocess(images: np.ndarray, size: int, order: str = 'clip') -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 [N, size, size, 3]: bicubic and centre crop in `order` (see module doc),
    CLIP-normalised."""
    if order not in PREPROCESSING:
        raise ValueError(f'unknown CLIP preprocessing {order!r}: use one of {PREPROCESSING}')
    square = _resize_then_crop if order == 'clip' else _crop_then_resize
    pixels = np.stack([square(image, size) for image in images]).astype(np.float32) / 255.0
    return (pixels - CLIP_MEAN) / CLIP_STD


class CLIPEmbedder:
    """L2-normalised image and text embeddings of a transformers CLIPModel folder (config.json,
    model.safetensors, tokenizer.json), computed over this process's devices."""

    def __init__(self, path: str, *, batch_size: int = 64):
        config_path, weights = os.path.join(path, CONFIG_NAME), os.path.join(path, TRANSFORMERS_WEIGHTS)
        for needed in (config_path, weights, os.path.join(path, 'tokenizer.json')):
            if not os.path.isfile(needed):
                raise FileNotFoundError(
                    f'{needed} not found: clip_weights must be a local Hugging Face CLIPModel '
                    'folder (e.g. openai/clip-vit-large-patch14-336 saved with save_pretrained)'
                )
        cfg = read_json(config_path)
        if 'text_config' not in cfg or 'vision_config' not in cfg:
            raise ValueError(f'{config_path} is not a CLIPModel config (it needs text_config and vision_config)')
        state = read_safetensors(weights)
        projection = {'projection_dim': cfg.get('projection_dim', 512)}
        self.text = CLIPTextModel.from_hf_config({**cfg['text_config'], **projection, 'architectures': None})
        self.vision = CLIPVisionModel.from_hf_config({**cfg['vision_config'], **projection})
        text_vars = variables_from_state_dict(
            self.text,
            'clip_text',
            {k: v for k, v in state.items() if k.startswith(('text_model.', 'text_projection.'))},
        )
        vision_vars = variables_from_state_dict(
            self.vision,
            'clip_vision',
            {k: v for k, v in state.items() if k.startswith(('vision_model.', 'visual_projection.'))},
        )
        self.tokenizer = create_tokenizer(path, max_length=self.text.max_position_embeddings)
        self.name = cfg.get('_name_or_path') or os.path.basename(os.path.normpath(path))
        self.batch_size, replicated, self.batch = sharding.local_inference(batch_size)
        self.text_vars, self.vision_vars = jax.device_put((text_vars, vision_vars), replicated)
        normalize = lambda e: e / jnp.linalg.norm(e, axis=-1, keepdims=True)
        self._image_fn = jax.jit(lambda v, x: normalize(self.vision.apply(v, x)['image_embeds']))
        self._text_fn = jax.jit(lambda v, ids, mask: normalize(self.text.apply(v, ids, mask)['text_embeds']))

    def _batched(self, fn, arrays: Sequence[np.ndarray]) -> np.ndarray:
        out, n = [], len(arrays[0])
        for start in range(0, n, self.batch_size):
            chunks = [a[start : start + self.batch_size] for a in arrays]
            padded = [np.concatenate([c, np.repeat(c[-1:], self.batch_size - len(c), 0)]) for c in chunks]
            out.append(np.asarray(fn(*[jax.device_put(p, self.batch) for p in padded]))[: len(chunks[0])])
        return np.concatenate(out)

    def image_embeds(self, images: np.ndarray, order: str = 'clip') -> np.ndarray:
        """uint8 [N, H, W, 3] -> [N, P], preprocessed for the CLIP score ('clip') or CMMD ('cmmd')."""
        pixels = preprocess(images, self.vision.image_size, order)
        return self._batched(lambda x: self._image_fn(self.vision_vars, x), [pixels])

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts (truncated at the tokenizer's length, 77 for CLIP) -> [N, P]."""
        encoded = self.tokenizer(list(prompts))
        return self._batched(
            lambda ids, mask: self._text_fn(self.text_vars, ids, mask),
            [encoded['input_ids'], encoded['attention_mask']],
        )
