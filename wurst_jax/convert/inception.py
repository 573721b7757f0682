"""Key table of the FID Inception (`models/inception.py`) and the reader of pytorch-fid's weight file.

pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` is the state dict of torchvision's Inception3
with the FID blocks: `Mixed_6b.branch7x7_2.conv.weight`, `...bn.{weight,bias,running_mean,running_var}`,
and a 1008-way `fc` that pool3 features do not use. Flax paths are those names split at the dots.
"""

import os

import jax.numpy as jnp
import numpy as np

from wurst_jax.convert.core import Component, read_safetensors, register, variables_from_state_dict
from wurst_jax.models.inception import InceptionV3FID

_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean', 'var': 'running_var'}


def _key(m: InceptionV3FID, path: tuple[str, ...]) -> str:
    _, *names, leaf = path
    return '.'.join(names + [_LEAVES.get(leaf, leaf)])


def _drop_classifier(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith('fc.')}


register(
    'inception_fid',
    Component(
        class_name='InceptionV3FID',
        library='pytorch-fid',
        from_config=lambda cfg: InceptionV3FID(),
        to_config=lambda m: {},
        example_inputs=lambda m: (jnp.zeros((1, 299, 299, 3)),),
        torch_key=_key,
        prepare_state=_drop_classifier,
    ),
)


def _read_state(path: str) -> dict[str, np.ndarray]:
    if path.endswith('.safetensors'):
        return read_safetensors(path)
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f'reading {path} needs PyTorch (pip install torch==2.14.1), or give the weights as .safetensors'
        ) from e
    state = torch.load(path, map_location='cpu', weights_only=True)
    return {k: v.numpy() for k, v in state.items()}


def load_inception_fid(path: str) -> tuple[InceptionV3FID, dict]:
    """(module, variables) from pytorch-fid's weight file (.pth) or a .safetensors of the same keys."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception weights {path} not found: give pytorch-fid's "
            'pt_inception-2015-12-05-6726825d.pth (or a .safetensors of it)'
        )
    try:
        state = _read_state(path)
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # truncated or not a weight file
        raise ValueError(
            f"cannot read Inception weights {path}: {e}. Is the file complete? pytorch-fid's file is about 91 MB."
        ) from e
    module = InceptionV3FID()
    return module, variables_from_state_dict(module, 'inception_fid', state)
