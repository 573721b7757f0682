"""What every wurst_jax TFDS builder shares: the record layout and the offline builder basics."""

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, C] image (TFDS cannot encode numpy without TensorFlow)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='PNG')
    return buffer.getvalue()


class CaptionedImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Records of {'image': encoded image, 'caption': text, 'id': int64}, built without downloads."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.'}
    # Nothing is downloaded, so there are no checksums to locate; tfds' lookup of the code path
    # would import `importlib_resources`, which the stack does not ship.
    code_path = None

    def image_shape(self) -> tuple[int | None, int | None, int]:
        """Shape of the stored images; None where sizes vary."""
        return (None, None, 3)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    'image': tfds.features.Image(shape=self.image_shape()),
                    'caption': tfds.features.Text(),
                    'id': tfds.features.Scalar(np.int64),
                }
            )
        )
