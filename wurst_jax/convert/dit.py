"""PixArt-α's re-parameterised start from a class-conditional DiT (Chen et al., arXiv:2310.00426, §2.3).

From a diffusers `DiTTransformer2DModel` folder, a `PixArtTransformer` whose weights are DiT's where
the two share a layer (patch embedding, timestep MLP, self-attention, MLP, output projection) and
whose adaLN-single parts are set so that at one timestep t* (500) every block's modulation, and the
final layer's, equal DiT's with the class embedding removed:

  t_block       = block 0's adaLN linear (how PixArt initialised it is not published)
  E_i           = adaLN_i(SiLU(c(t*))) − t_block(SiLU(e(t*)))      per block, [6, D]
  E_final       = proj_out_1(SiLU(c(t*))) − e(t*)                   [2, D]

where c is DiT's timestep embedding and e PixArt's (the same MLP on a sinusoid without DiT's
frequency shift). The cross-attention output projections are zero, so at t* the model is DiT's
unconditional network whatever the text; the caption projection and cross-attention q/k/v start
from PixArt's init. PixArt's layer norms use eps 1e-6, as the original DiT; a diffusers DiT folder
with norm_eps 1e-5 differs from it by that eps in each MLP's norm.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from wurst_jax.convert.core import (
    CONFIG_NAME,
    DIFFUSERS_WEIGHTS,
    read_json,
    read_safetensors,
    state_dict_from_variables,
    variables_from_state_dict,
)
from wurst_jax.models.pixart import PixArtTransformer, sinusoid_frequencies

_SHARED = ('attn1.', 'ff.')  # per-block layers DiT and PixArt share


def _linear(state: dict, key: str, x: np.ndarray) -> np.ndarray:
    return x @ state[f'{key}.weight'].astype(np.float64).T + state[f'{key}.bias']


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def _sinusoid(t: float, shift: int) -> np.ndarray:
    """diffusers' Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=shift) of one t, with the
    float32 angles that both models compute (their rounding at t ~ 500 is ~1e-5)."""
    angles = (np.float32(t) * sinusoid_frequencies(256, shift)).astype(np.float64)
    return np.concatenate([np.cos(angles), np.sin(angles)])


def pixart_from_dit(
    path: str, *, caption_channels: int | None, t: float = 500.0, seed: int = 0, **overrides
) -> tuple[PixArtTransformer, dict]:
    """(module, variables) of a PixArt transformer started from the DiT folder at `path`."""
    cfg = read_json(os.path.join(path, CONFIG_NAME))
    if cfg.get('_class_name') != 'DiTTransformer2DModel':
        raise ValueError(f'{path} holds a {cfg.get("_class_name")}, not a diffusers DiTTransformer2DModel folder')
    dit = read_safetensors(os.path.join(path, DIFFUSERS_WEIGHTS))
    in_channels = cfg.get('in_channels', 4)
    module = PixArtTransformer(
        in_channels=in_channels,
        out_channels=cfg.get('out_channels') or in_channels,
        num_heads=cfg.get('num_attention_heads', 16),
        head_dim=cfg.get('attention_head_dim', 72),
        depth=cfg.get('num_layers', 28),
        patch_size=cfg.get('patch_size', 2),
        sample_size=cfg.get('sample_size', 32),
        interpolation_scale=1,
        caption_channels=caption_channels,
        use_additional_conditions=False,
        **overrides,
    )
    d, p = module.width, module.patch_size
    text = jnp.zeros((1, 1, caption_channels or d))
    fresh = jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, p, p, in_channels)), jnp.zeros((1,)), text)
    state = state_dict_from_variables(module, 'pixart', fresh)

    for key, value in dit.items():
        if key.startswith('pos_embed.proj.') or (
            key.startswith('transformer_blocks.') and key.split('.', 2)[2].startswith(_SHARED)
        ):
            state[key] = value
    state.update({k.replace('proj_out_2.', 'proj_out.'): v for k, v in dit.items() if k.startswith('proj_out_2.')})
    embedder = 'transformer_blocks.0.norm1.emb.timestep_embedder'
    for layer in ('linear_1', 'linear_2'):
        for leaf in ('weight', 'bias'):
            state[f'adaln_single.emb.timestep_embedder.{layer}.{leaf}'] = dit[f'{embedder}.{layer}.{leaf}']
    for leaf in ('weight', 'bias'):
        state[f'adaln_single.linear.{leaf}'] = dit[f'transformer_blocks.0.norm1.linear.{leaf}']

    def dit_embedding(block: int, shift: int) -> np.ndarray:  # diffusers keeps a copy per block
        key = f'transformer_blocks.{block}.norm1.emb.timestep_embedder'
        return _linear(dit, f'{key}.linear_2', _silu(_linear(dit, f'{key}.linear_1', _sinusoid(t, shift))))

    c, e = dit_embedding(0, shift=1), dit_embedding(0, shift=0)
    shared = _linear(dit, 'transformer_blocks.0.norm1.linear', _silu(e))
    for i in range(module.depth):
        own = _linear(dit, f'transformer_blocks.{i}.norm1.linear', _silu(dit_embedding(i, shift=1)))
        state[f'transformer_blocks.{i}.scale_shift_table'] = (own - shared).reshape(6, d).astype(np.float32)
        for leaf in ('weight', 'bias'):  # cross-attention adds nothing until it is trained
            state[f'transformer_blocks.{i}.attn2.to_out.0.{leaf}'] = np.zeros_like(
                state[f'transformer_blocks.{i}.attn2.to_out.0.{leaf}']
            )
    final = _linear(dit, 'proj_out_1', _silu(c)).reshape(2, d)
    state['scale_shift_table'] = (final - e[None]).astype(np.float32)
    return module, variables_from_state_dict(module, 'pixart', state)
