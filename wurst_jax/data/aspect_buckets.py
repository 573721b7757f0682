"""Multi-aspect buckets (PixArt-α App. A.5; PixArt-alpha/PixArt-alpha `diffusion/data/datasets/utils.py`):
every batch takes all its images from one bucket, a (height, width) of about the area of the square training size.

The table is PixArt-α's `ASPECT_RATIO_1024` (40 ratios h/w from 0.25 to 4); for a training size S
its sides are scaled by S/1024 and rounded to a multiple of `multiple` (default S/16, which gives
PixArt's own 256 and 512 tables exactly). An image goes to the bucket of the nearest ratio.

The order is planned per epoch from the seed alone, so every process computes the same global
batches and takes its rows: shuffle all indices, split them by bucket in that order, cut each
bucket into whole global batches (its remainder waits for the next epoch's shuffle), and shuffle
the batches. An iterator's state is still one index, as for square batches.
"""

import io
import logging
import sys
from collections.abc import Sequence

import grain
import numpy as np
from PIL import Image

# ratio h/w -> (h, w) at 1024 px.
ASPECT_RATIOS_1024 = {
    0.25: (512, 2048),
    0.26: (512, 1984),
    0.27: (512, 1920),
    0.28: (512, 1856),
    0.32: (576, 1792),
    0.33: (576, 1728),
    0.35: (576, 1664),
    0.4: (640, 1600),
    0.42: (640, 1536),
    0.48: (704, 1472),
    0.5: (704, 1408),
    0.52: (704, 1344),
    0.57: (768, 1344),
    0.6: (768, 1280),
    0.68: (832, 1216),
    0.72: (832, 1152),
    0.78: (896, 1152),
    0.82: (896, 1088),
    0.88: (960, 1088),
    0.94: (960, 1024),
    1.0: (1024, 1024),
    1.07: (1024, 960),
    1.13: (1088, 960),
    1.21: (1088, 896),
    1.29: (1152, 896),
    1.38: (1152, 832),
    1.46: (1216, 832),
    1.67: (1280, 768),
    1.75: (1344, 768),
    2.0: (1408, 704),
    2.09: (1472, 704),
    2.4: (1536, 640),
    2.5: (1600, 640),
    2.89: (1664, 576),
    3.0: (1728, 576),
    3.11: (1792, 576),
    3.62: (1856, 512),
    3.75: (1920, 512),
    3.88: (1984, 512),
    4.0: (2048, 512),
}


def bucket_table(image_size: int, multiple: int = 0) -> tuple[tuple[float, int, int], ...]:
    """(ratio, height, width) of every bucket for square training size `image_size`."""
    multiple = multiple or max(1, image_size // 16)
    scale = image_size / 1024
    return tuple(
        (
            ratio,
            max(multiple, round(h * scale / multiple) * multiple),
            max(multiple, round(w * scale / multiple) * multiple),
        )
        for ratio, (h, w) in ASPECT_RATIOS_1024.items()
    )


def closest_bucket(height: int, width: int, table: Sequence[tuple[float, int, int]]) -> int:
    """Index of the bucket whose ratio is nearest the image's h/w."""
    return int(np.argmin([abs(ratio - height / width) for ratio, _, _ in table]))


def image_sizes(source: Sequence[dict]) -> np.ndarray:
    """[N, 2] (height, width) of every record's encoded image, from its header alone."""
    sizes = np.empty((len(source), 2), np.int64)
    for i in range(len(source)):
        with Image.open(io.BytesIO(source[i]['image'])) as image:
            sizes[i] = image.size[::-1]
        if i and i % 100_000 == 0:
            logging.info('aspect buckets: read the sizes of %d of %d images', i, len(source))
    return sizes


class BucketedOrder(grain.MapDataset):
    """Endless global order: element i is {'index': record index, 'bucket': bucket index}, and each
    consecutive run of `global_batch` elements shares one bucket."""

    def __init__(self, buckets: np.ndarray, global_batch: int, seed: int):
        super().__init__()
        self._buckets, self._batch, self._seed = np.asarray(buckets), global_batch, seed
        counts = np.bincount(self._buckets)
        self._batches_per_epoch = int(np.sum(counts // global_batch))
        if self._batches_per_epoch == 0:
            raise ValueError(
                f'no aspect bucket holds a whole global batch of {global_batch} images '
                f'(bucket sizes {sorted(counts[counts > 0].tolist(), reverse=True)[:8]}): '
                'use a smaller input.batch_size or input.aspect_buckets=False'
            )
        self._plan = (-1, None)

    def __len__(self) -> int:
        return sys.maxsize

    def _epoch_plan(self, epoch: int) -> np.ndarray:
        """[batches_per_epoch, global_batch] record indices of one epoch."""
        cached_epoch, plan = self._plan
        if cached_epoch == epoch:
            return plan
        rng = np.random.default_rng([self._seed, epoch])
        order = rng.permutation(len(self._buckets))
        batches = []
        for bucket in np.unique(self._buckets):
            members = order[self._buckets[order] == bucket]
            whole = len(members) // self._batch * self._batch
            batches.extend(members[:whole].reshape(-1, self._batch))
        plan = np.stack(batches)[rng.permutation(len(batches))]
        self._plan = (epoch, plan)  # one tuple assignment: safe for grain's reader threads
        return plan

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, row = divmod(index, self._batch)
        epoch, batch = divmod(step, self._batches_per_epoch)
        record = int(self._epoch_plan(epoch)[batch, row])
        return {'index': record, 'bucket': int(self._buckets[record])}
