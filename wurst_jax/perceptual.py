"""Reads VGG16 weights for the perceptual loss from a local file the user provides."""

import os

import numpy as np

from wurst_jax.models import vgg


def load_vgg16_params(path: str) -> dict:
    """Flax params of VGG16Features from torchvision's `vgg16` state dict saved as .npz or .pth.

    Only the `features.<i>.weight/bias` entries are read; nothing is downloaded.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'config.loss.perceptual_weights={path!r} is not a file: give a local copy of '
            "torchvision's vgg16 state dict (.pth, or .npz with the same keys), or set "
            'config.loss.perceptual_weight=0'
        )
    if path.endswith('.npz'):
        with np.load(path) as data:
            state = {k: data[k] for k in data.files}
    else:
        import torch  # only needed for .pth files

        state = {k: v.numpy() for k, v in torch.load(path, map_location='cpu', weights_only=True).items()}
    params = {}
    for index in vgg.torch_indices():
        weight, bias = state.get(f'features.{index}.weight'), state.get(f'features.{index}.bias')
        if weight is None or bias is None:
            raise KeyError(
                f"{path} has no features.{index}.weight/bias: expected the keys of torchvision's vgg16().state_dict()"
            )
        # torch OIHW -> flax HWIO
        params[f'features_{index}'] = {
            'kernel': np.transpose(weight, (2, 3, 1, 0)).astype(np.float32),
            'bias': bias.astype(np.float32),
        }
    return params
