"""Key table of PixArt-α (`models/pixart.py`) <-> diffusers `PixArtTransformer2DModel` folders.

Flax names are diffusers' with four renames: `blocks_i` <-> `transformer_blocks.i`, the global
timestep / size MLPs and `t_block` live under `adaln_single` (`adaln_single.emb.*`,
`adaln_single.linear`), `pos_embed_proj` <-> `pos_embed.proj`, and Sequential indices come back
(`to_out.0`, `ff.net.0.proj`, `ff.net.2`, `caption_projection.linear_1`).

Original PixArt `.pth` files (`load_diffusers('PixArt-XL-2-512x512.pth', 'pixart')`) have their
architecture read off their tensors (`original_fields`) but for the head count: 16, as the released XL-2
files, or `convert.original.load_original(path, 'pixart', {'num_attention_heads': n})`. They carry
the names of PixArt-alpha's own modules; `original_to_diffusers` renames them the way diffusers'
converter does, splitting the fused `attn.qkv` and `cross_attn.kv_linear`. Two tensors of those files
are not weights: `pos_embed`, the fixed positions, gives the base grid and the `interpolation_scale`
(and is checked against the ones the module computes), and
`y_embedder.y_embedding`, the fixed random caption that replaced dropped captions in training, is
dropped as diffusers' converter drops it (sampling uses the empty caption's states instead).
"""

import math

import jax.numpy as jnp
import numpy as np

from wurst_jax.convert.core import Component, register
from wurst_jax.models.pixart import PixArtTransformer

_LEAVES = {'kernel': 'weight'}
_NAMES = {
    'pos_embed_proj': 'pos_embed.proj',
    't_block': 'adaln_single.linear',
    'timestep_embedder': 'adaln_single.emb.timestep_embedder',
    'resolution_embedder': 'adaln_single.emb.resolution_embedder',
    'aspect_ratio_embedder': 'adaln_single.emb.aspect_ratio_embedder',
    'caption_projection_linear_1': 'caption_projection.linear_1',
    'caption_projection_linear_2': 'caption_projection.linear_2',
    'to_out': 'to_out.0',
    'ff_net_0': 'ff.net.0.proj',
    'ff_net_2': 'ff.net.2',
}
# What this module implements of the diffusers config; other values are refused by name.
_FIXED = {
    'activation_fn': 'gelu-approximate',
    'norm_type': 'ada_norm_single',
    'norm_elementwise_affine': False,
    'norm_eps': 1e-6,
    'attention_bias': True,
    'attention_type': 'default',
    'upcast_attention': False,
    'dropout': 0.0,
}


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
        in_channels=in_channels,
        out_channels=cfg.get('out_channels') or in_channels,
        num_heads=heads,
        head_dim=head_dim,
        depth=cfg.get('num_layers', 28),
        patch_size=cfg.get('patch_size', 2),
        sample_size=sample_size,
        interpolation_scale=cfg.get('interpolation_scale'),
        caption_channels=cfg.get('caption_channels'),
        use_additional_conditions=sample_size == 128 if additional is None else additional,
    )


def _config(m: PixArtTransformer) -> dict:
    return dict(
        num_attention_heads=m.num_heads,
        attention_head_dim=m.head_dim,
        in_channels=m.in_channels,
        out_channels=m.out_channels,
        num_layers=m.depth,
        patch_size=m.patch_size,
        sample_size=m.sample_size,
        interpolation_scale=m.interpolation_scale,
        caption_channels=m.caption_channels,
        use_additional_conditions=m.use_additional_conditions,
        cross_attention_dim=m.width,
        num_embeds_ada_norm=1000,
        **_FIXED,
    )


def _inputs(m: PixArtTransformer) -> tuple:
    p = m.patch_size
    extra = (jnp.ones((1, 2)), jnp.ones((1, 1))) if m.use_additional_conditions else ()
    return (
        jnp.zeros((1, 2 * p, 2 * p, m.in_channels)),
        jnp.zeros((1,)),
        jnp.zeros((1, 4, m.caption_channels or m.width)),
        jnp.ones((1, 4), bool),
        *extra,
    )


def _key(m: PixArtTransformer, path: tuple[str, ...]) -> str:
    _, *names, leaf = path
    parts = [
        f'transformer_blocks.{name.split("_")[1]}' if name.startswith('blocks_') else _NAMES.get(name, name)
        for name in names
    ]
    return '.'.join(parts + [_LEAVES.get(leaf, leaf)])


# Original module name -> diffusers name, per prefix (PixArt-alpha's tools/convert_pixart_alpha_to_diffusers.py).
_ORIGINAL_PREFIXES = {
    'x_embedder.proj.': 'pos_embed.proj.',
    't_block.1.': 'adaln_single.linear.',
    't_embedder.mlp.0.': 'adaln_single.emb.timestep_embedder.linear_1.',
    't_embedder.mlp.2.': 'adaln_single.emb.timestep_embedder.linear_2.',
    'csize_embedder.mlp.0.': 'adaln_single.emb.resolution_embedder.linear_1.',
    'csize_embedder.mlp.2.': 'adaln_single.emb.resolution_embedder.linear_2.',
    'ar_embedder.mlp.0.': 'adaln_single.emb.aspect_ratio_embedder.linear_1.',
    'ar_embedder.mlp.2.': 'adaln_single.emb.aspect_ratio_embedder.linear_2.',
    'y_embedder.y_proj.fc1.': 'caption_projection.linear_1.',
    'y_embedder.y_proj.fc2.': 'caption_projection.linear_2.',
    'final_layer.linear.': 'proj_out.',
    'final_layer.scale_shift_table': 'scale_shift_table',
}
_ORIGINAL_BLOCK = {
    'attn.proj.': 'attn1.to_out.0.',
    'mlp.fc1.': 'ff.net.0.proj.',
    'mlp.fc2.': 'ff.net.2.',
    'cross_attn.q_linear.': 'attn2.to_q.',
    'cross_attn.proj.': 'attn2.to_out.0.',
    'scale_shift_table': 'scale_shift_table',
}
_FUSED = {
    'attn.qkv.': ('attn1.to_q.', 'attn1.to_k.', 'attn1.to_v.'),
    'cross_attn.kv_linear.': ('attn2.to_k.', 'attn2.to_v.'),
}
_NOT_WEIGHTS = ('pos_embed', 'y_embedder.y_embedding')
_INTERPOLATION_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # diffusers' converter: 0.5, 1 and 2 at 256, 512, 1024 px


def _rename(key: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def original_to_diffusers(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An original PixArt state dict (weights only) in diffusers' names; a diffusers one is returned as is."""
    if 'x_embedder.proj.weight' not in state:
        return state
    out, unknown = {}, []
    for key, value in state.items():
        if key in _NOT_WEIGHTS:
            continue
        if key.startswith('blocks.'):
            _, index, rest = key.split('.', 2)
            prefix = f'transformer_blocks.{index}.'
            fused = next((f for f in _FUSED if rest.startswith(f)), None)
            if fused:
                leaf = rest[len(fused) :]
                for name, part in zip(_FUSED[fused], np.split(value, len(_FUSED[fused]), axis=0)):
                    out[prefix + name + leaf] = part
                continue
            new = _rename(rest, _ORIGINAL_BLOCK)
            new = new and prefix + new
        else:
            new = _rename(key, _ORIGINAL_PREFIXES)
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(f'original PixArt checkpoint has tensors this converter does not know: {unknown}')
    return out


def original_fields(state: dict[str, np.ndarray], num_heads: int) -> dict:
    """The diffusers config fields of an original PixArt state dict, read off its tensors: all but the
    head count (16 in the released XL-2 files), which splits the width. {} for diffusers names."""
    if 'x_embedder.proj.weight' not in state:
        return {}
    width, in_channels, patch, _ = state['x_embedder.proj.weight'].shape
    if width % num_heads:
        raise ValueError(f'PixArt checkpoint width {width} is not a multiple of num_attention_heads={num_heads}')
    fields = dict(
        in_channels=in_channels,
        out_channels=state['final_layer.linear.weight'].shape[0] // patch**2,
        num_layers=1 + max(int(k.split('.')[1]) for k in state if k.startswith('blocks.')),
        patch_size=patch,
        num_attention_heads=num_heads,
        attention_head_dim=width // num_heads,
        cross_attention_dim=width,
        caption_channels=state['y_embedder.y_proj.fc1.weight'].shape[1],
        use_additional_conditions='csize_embedder.mlp.0.weight' in state,
    )
    if 'pos_embed' in state:  # the base grid, and the interpolation scale whose positions these are
        stored = np.asarray(state['pos_embed']).reshape(-1, width)
        grid = math.isqrt(stored.shape[0])
        fields['sample_size'] = grid * patch
        module = _from_config(fields)
        for scale in _INTERPOLATION_SCALES:
            if np.allclose(stored, module.clone(interpolation_scale=scale).positions(grid, grid), atol=1e-4):
                fields['interpolation_scale'] = scale
                break
    return fields


def _check_positions(module: PixArtTransformer, state: dict[str, np.ndarray]) -> None:
    """The file's fixed positions must be the module's: else its sample_size / interpolation_scale differ."""
    if 'pos_embed' not in state:
        return
    stored = np.asarray(state['pos_embed']).reshape(-1, module.width)
    base = module.sample_size // module.patch_size
    if stored.shape[0] != base * base:
        raise ValueError(
            f"pos_embed of the checkpoint has {stored.shape[0]} positions, the module's base grid "
            f'{base}x{base} (sample_size={module.sample_size}): pass the sample_size it was trained at'
        )
    ours = np.asarray(module.positions(base, base))
    if not np.allclose(stored, ours, atol=1e-4):
        scales = [
            s
            for s in _INTERPOLATION_SCALES
            if np.allclose(stored, module.clone(interpolation_scale=s).positions(base, base), atol=1e-4)
        ]
        raise ValueError(
            f"pos_embed of the checkpoint is not the module's (interpolation_scale="
            f'{module.interpolation_scale}); it matches interpolation_scale={scales or "none of 0.25-4"}'
        )


register(
    'pixart',
    Component(
        'PixArtTransformer2DModel',
        'diffusers',
        _from_config,
        _config,
        _inputs,
        _key,
        prepare_state=original_to_diffusers,
        check_state=_check_positions,
    ),
)
