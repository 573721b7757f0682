"""`photos`: the colour photographs bundled with scikit-image, astronaut held out as `test`.

Only photos that ship inside the scikit-image wheel are used, so nothing is downloaded
(`skimage.data.cat` is the same picture as `chelsea` and is left out).
"""

from collections.abc import Callable

import numpy as np
from skimage import data as skdata

from wurst_jax.data.captioned import CaptionedImageBuilder, encode_png


def _stereo_left() -> np.ndarray:
    """Left view of the Middlebury motorcycle stereo pair."""
    return skdata.stereo_motorcycle()[0]


def _stereo_right() -> np.ndarray:
    """Right view of the Middlebury motorcycle stereo pair."""
    return skdata.stereo_motorcycle()[1]


# name -> (loader returning uint8 [H, W, 3], caption). Order fixes the ids.
TRAIN_PHOTOS: dict[str, tuple[Callable[[], np.ndarray], str]] = {
    'chelsea': (skdata.chelsea, 'a photo of a ginger tabby cat'),
    'coffee': (skdata.coffee, 'a photo of a cup of coffee on a saucer'),
    'rocket': (skdata.rocket, 'a photo of a rocket on its launch pad'),
    'immunohistochemistry': (skdata.immunohistochemistry, 'a microscope image of immunohistochemically stained tissue'),
    'hubble_deep_field': (skdata.hubble_deep_field, 'a telescope image of distant galaxies'),
    'retina': (skdata.retina, 'a photo of a human retina'),
    'motorcycle_left': (_stereo_left, 'a photo of a motorcycle, left view'),
    'motorcycle_right': (_stereo_right, 'a photo of a motorcycle, right view'),
}
TEST_PHOTOS: dict[str, tuple[Callable[[], np.ndarray], str]] = {
    'astronaut': (skdata.astronaut, 'a portrait photo of an astronaut')
}


def astronaut_crops(size: int = 64) -> np.ndarray:
    """Non-overlapping tiles of the 512x512 astronaut, row-major: uint8 [N, size, size, 3]."""
    image = skdata.astronaut()
    rows, cols = image.shape[0] // size, image.shape[1] // size
    if rows == 0 or cols == 0:
        raise ValueError(f'crop size {size} exceeds the astronaut image {image.shape[:2]}')
    tiles = image[: rows * size, : cols * size].reshape(rows, size, cols, size, 3)
    return np.ascontiguousarray(tiles.transpose(0, 2, 1, 3, 4).reshape(rows * cols, size, size, 3))


class Photos(CaptionedImageBuilder):
    """scikit-image's colour photos: train = the bundled photos, test = astronaut alone."""

    def _split_generators(self, dl_manager):
        return {
            'train': self._generate_examples(TRAIN_PHOTOS, first_id=0),
            'test': self._generate_examples(TEST_PHOTOS, first_id=len(TRAIN_PHOTOS)),
        }

    def _generate_examples(self, photos: dict, first_id: int):
        for offset, (name, (load, caption)) in enumerate(photos.items()):
            yield name, {'image': encode_png(load()), 'caption': caption, 'id': first_id + offset}
