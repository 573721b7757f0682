"""Weights between wurst_jax Flax modules and diffusers/transformers model folders, both ways.

    module, variables = load_diffusers('/models/wuerstchen-prior/prior', 'prior')
    eps = module.apply(variables, x, r, clip_tokens)
    save_diffusers(module, variables, '/tmp/prior_out', 'prior')   # from_pretrained() loads it

`variables` is the Flax variables dict ({'params': ...}, plus 'batch_stats' where the network has
BatchNorm). Folders are read with safetensors; original `.pt` checkpoints (`original.py`) with
torch.load(weights_only=True), never by unpickling arbitrary objects.
"""
from wurst_jax.convert import clip  # noqa: F401
from wurst_jax.convert import effnet  # noqa: F401
from wurst_jax.convert import inception  # noqa: F401
from wurst_jax.convert import pixart  # noqa: F401
from wurst_jax.convert import wuerstchen  # noqa: F401  (registers its components)
from wurst_jax.convert.core import COMPONENTS, load_diffusers, save_diffusers, shapes_only
from wurst_jax.convert.original import load_original

__all__ = ['COMPONENTS', 'load_diffusers', 'load_original', 'save_diffusers', 'shapes_only']
