"""Key table of PixArt-α (`models/pixart.py`) <-> diffusers `PixArtTransformer2DModel` folders.

Flax names are diffusers' with four renames: `blocks_i` <-> `transformer_blocks.i`, the global
timestep / size MLPs and `t_block` live under `adaln_single` (`adaln_single.emb.*`,
`adaln_single.linear`), `pos_embed_proj` <-> `pos_embed.proj`, and Sequential indices come back
(`to_out.0`, `ff.net.0.proj`, `ff.net.2`, `caption_projection.linear_1`).
"""
import jax.numpy as jnp

from wurst_jax.convert.core import Component, register
from wurst_jax.models.pixart import PixArtTransformer

_LEAVES = {'kernel': 'weight'}
_NAMES = {'pos_embed_proj': 'pos_embed.proj', 't_block': 'adaln_single.linear',
          'timestep_embedder': 'adaln_single.emb.timestep_embedder',
          'resolution_embedder': 'adaln_single.emb.resolution_embedder',
          'aspect_ratio_embedder': 'adaln_single.emb.aspect_ratio_embedder',
          'caption_projection_linear_1': 'caption_projection.linear_1',
          'caption_projection_linear_2': 'caption_projection.linear_2',
          'to_out': 'to_out.0', 'ff_net_0': 'ff.net.0.proj', 'ff_net_2': 'ff.net.2'}
# What this module implements of the diffusers config; other values are refused by name.
_FIXED = {'activation_fn': 'gelu-approximate', 'norm_type': 'ada_norm_single', 'norm_elementwise_affine': False,
          'norm_eps': 1e-6, 'attention_bias': True, 'attention_type': 'default', 'upcast_attention': False,
          'dropout': 0.0}


def _from_config(cfg: dict) -> PixArtTransformer:
    for field, value in _FIXED.items():
        if cfg.get(field, value) != value:
            raise ValueError(f'PixArt config {field}={cfg[field]!r} is not supported (only {value!r})')
    heads, head_dim = cfg.get('num_attention_heads', 16), cfg.get('attention_head_dim', 72)
    cross = cfg.get('cross_attention_dim', 1152)
    if cross is not None and cross != heads * head_dim:
        raise ValueError(f'PixArt config cross_attention_dim={cross} must equal the width {heads * head_dim}')
    sample_size = cfg.get('sample_size', 128)
    additional = cfg.get('use_additional_conditions')
    in_channels = cfg.get('in_channels', 4)
    return PixArtTransformer(
        in_channels=in_channels, out_channels=cfg.get('out_channels') or in_channels, num_heads=heads,
        head_dim=head_dim, depth=cfg.get('num_layers', 28), patch_size=cfg.get('patch_size', 2),
        sample_size=sample_size, interpolation_scale=cfg.get('interpolation_scale'),
        caption_channels=cfg.get('caption_channels'),
        use_additional_conditions=sample_size == 128 if additional is None else additional)


def _config(m: PixArtTransformer) -> dict:
    return dict(num_attention_heads=m.num_heads, attention_head_dim=m.head_dim, in_channels=m.in_channels,
                out_channels=m.out_channels, num_layers=m.depth, patch_size=m.patch_size, sample_size=m.sample_size,
                interpolation_scale=m.interpolation_scale, caption_channels=m.caption_channels,
                use_additional_conditions=m.use_additional_conditions, cross_attention_dim=m.width,
                num_embeds_ada_norm=1000, **_FIXED)


def _inputs(m: PixArtTransformer) -> tuple:
    p = m.patch_size
    extra = (jnp.ones((1, 2)), jnp.ones((1, 1))) if m.use_additional_conditions else ()
    return (jnp.zeros((1, 2 * p, 2 * p, m.in_channels)), jnp.zeros((1,)),
            jnp.zeros((1, 4, m.caption_channels or m.width)), jnp.ones((1, 4), bool), *extra)


def _key(m: PixArtTransformer, path: tuple[str, ...]) -> str:
    _, *names, leaf = path
    parts = [f'transformer_blocks.{name.split("_")[1]}' if name.startswith('blocks_') else _NAMES.get(name, name)
             for name in names]
    return '.'.join(parts + [_LEAVES.get(leaf, leaf)])


register('pixart', Component('PixArtTransformer2DModel', 'diffusers', _from_config, _config, _inputs, _key))
