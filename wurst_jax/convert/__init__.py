"""Weights between wurst_jax Flax modules and diffusers/transformers model folders, both ways.

    module, variables = load_diffusers('/models/wuerstchen-prior/prior', 'prior')
    eps = module.apply(variables, x, r, clip_tokens)
    save_diffusers(module, variables, '/tmp/prior_out', 'prior')   # from_pretrained() loads it

`variables` is the Flax variables dict ({'params': ...}, plus 'batch_stats' where the network has
BatchNorm). Folders are read with safetensors; original `.pt` checkpoints (`original.py`) with
torch.load(weights_only=True), never by unpickling arbitrary objects.
"""

import os
from typing import Any

import flax.linen as nn

from wurst_jax.convert import clip, effnet, inception, pixart, stable_cascade, t5, wuerstchen  # noqa: F401  (they register components)
from wurst_jax.convert.core import COMPONENTS, load_folder, reading_shapes_only, save_diffusers, shapes_only
from wurst_jax.convert.original import load_original, save_original


def load_diffusers(path: str, name: str, **module_overrides: Any) -> tuple[nn.Module, dict]:
    """(module, Flax variables) of component `name` from a local diffusers or transformers model
    folder (`core.load_folder`) or an original checkpoint file (`original.load_original`)."""
    if os.path.isfile(path):
        return load_original(path, name, **module_overrides)
    return load_folder(path, name, **module_overrides)


__all__ = [
    'COMPONENTS',
    'load_diffusers',
    'load_original',
    'reading_shapes_only',
    'save_diffusers',
    'save_original',
    'shapes_only',
]
