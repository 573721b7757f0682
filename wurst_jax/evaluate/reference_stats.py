"""Reference statistics for FID (and CLIP embeddings for CMMD) of a set of real images.

  python -m wurst_jax.evaluate.reference_stats --images=DIR --out=REF.npz \
      --inception_weights=pt_inception-2015-12-05-6726825d.pth [--clip_weights=DIR] [--image_size=256]
  python -m wurst_jax.evaluate.reference_stats --images=tfds:shapes --split=test --data_dir=DIR ...

Every image is resized (bicubic) so its shorter side is `image_size`, centre-cropped to a square and
kept as uint8, i.e. what the generated images are, then goes through the same FID resize to 299.
Unreadable files in a folder are skipped and counted in the printed summary. The .npz holds `mu` and
`sigma` (readable by pytorch-fid and clean-fid), `count`, and `clip_embeds` when clip_weights are given.
"""

import json
import pathlib
from typing import Iterator

import numpy as np
from absl import app, flags
from PIL import Image

from wurst_jax import config_lib
from wurst_jax.data import input_pipeline
from wurst_jax.data.image_folder import IMAGE_SUFFIXES
from wurst_jax.evaluate import clip_metrics, fid

_IMAGES = flags.DEFINE_string('images', None, 'A folder of images, or tfds:NAME for a prepared TFDS dataset.')
_OUT = flags.DEFINE_string('out', None, 'The .npz to write.')
_INCEPTION = flags.DEFINE_string('inception_weights', None, "pytorch-fid's Inception weights (.pth or .safetensors).")
_CLIP = flags.DEFINE_string('clip_weights', None, 'A local HF CLIPModel folder: also store CLIP image embeddings.')
_SIZE = flags.DEFINE_integer('image_size', 256, 'Images are centre-cropped squares of this size (the generated size).')
_RESIZE = flags.DEFINE_enum('resize', 'clean', list(fid.RESIZE_MODES), 'The resize to 299 (as the eval config).')
_SPLIT = flags.DEFINE_string('split', 'test', 'Split of a TFDS dataset.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data_dir of a tfds: dataset.')
_MAX = flags.DEFINE_integer('max_images', 0, 'Use at most this many images (0: all).')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Images per forward pass.')
flags.mark_flags_as_required(['images', 'out', 'inception_weights'])


def square_uint8(image: Image.Image, size: int) -> np.ndarray:
    image = input_pipeline.resize_shorter_side(image.convert('RGB'), size)
    left, top = input_pipeline.center_crop_offset(*image.size, size)
    return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def read_images(spec: str, size: int, skipped: list[str]) -> Iterator[np.ndarray]:
    """uint8 squares from a folder (unreadable files appended to `skipped`) or a TFDS dataset."""
    if spec.startswith('tfds:'):
        input_config = config_lib.input_config(spec.removeprefix('tfds:'), image_size=size, batch_size=1)
        input_config.data_dir = _DATA_DIR.value or input_config.data_dir
        for example in input_pipeline.get_source(input_config, _SPLIT.value):
            yield square_uint8(input_pipeline.decode_image(example['image']), size)
        return
    folder = pathlib.Path(spec)
    if not folder.is_dir():
        raise SystemExit(f'--images={spec} is neither a folder nor tfds:NAME')
    for path in sorted(p for p in folder.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as image:
                yield square_uint8(image, size)
        except (OSError, ValueError) as e:
            skipped.append(f'{path}: {e}')


def batches(images: Iterator[np.ndarray], batch_size: int, limit: int) -> Iterator[np.ndarray]:
    batch, seen = [], 0
    for image in images:
        batch.append(image)
        seen += 1
        if len(batch) == batch_size or seen == limit:
            yield np.stack(batch)
            batch = []
        if seen == limit:
            return
    if batch:
        yield np.stack(batch)


def main(argv):
    del argv
    from wurst_jax.convert.inception import load_inception_fid

    inception = fid.InceptionFeatures(
        *load_inception_fid(_INCEPTION.value), resize=_RESIZE.value, batch_size=_BATCH.value
    )
    clip = clip_metrics.CLIPEmbedder(_CLIP.value, batch_size=_BATCH.value) if _CLIP.value else None
    stats, embeds, skipped = fid.GaussianStats(), [], []
    for batch in batches(read_images(_IMAGES.value, _SIZE.value, skipped), _BATCH.value, _MAX.value):
        stats.update(inception(batch))
        if clip:
            embeds.append(clip.image_embeds(batch, 'cmmd'))
    if stats.count < 2:
        raise SystemExit(f'--images={_IMAGES.value} gave {stats.count} readable images; FID needs many (10k+)')
    mu, sigma = stats.mean_and_cov()
    extra = {'clip_embeds': np.concatenate(embeds)} if clip else {}
    fid.save_stats(_OUT.value, mu, sigma, count=np.int64(stats.count), **extra)
    print(
        json.dumps(
            {
                'out': _OUT.value,
                'num_images': stats.count,
                'num_skipped': len(skipped),
                'skipped': skipped[:20],
                'resize': _RESIZE.value,
                'image_size': _SIZE.value,
                'clip_embeds': bool(clip),
            }
        )
    )


if __name__ == '__main__':
    app.run(main)
