"""Weights between wurst_jax Flax modules and diffusers model folders, in both directions.

    module, variables = load_diffusers('/models/wuerstchen-prior/prior', 'prior')
    eps = module.apply(variables, x, r, clip_tokens)
    save_diffusers(module, variables, '/tmp/prior_out', 'prior')   # from_pretrained() loads it

`variables` is the Flax variables dict ({'params': ...}, plus 'batch_stats' for the VQGAN). Files
are read with safetensors only. Components so far: prior (WuerstchenPrior), vqgan (PaellaVQModel).
"""
from wurst_jax.convert.diffusers_io import COMPONENTS, load_diffusers, save_diffusers

__all__ = ['COMPONENTS', 'load_diffusers', 'save_diffusers']
