"""Key tables of the Würstchen diffusers models: prior (WuerstchenPrior), decoder
(WuerstchenDiffNeXt), vqgan (PaellaVQModel); and of Würstchen v1's Stage B, paella (dome272/Wuerstchen
`modules.py` `Paella`, which diffusers never ported: its files are the official checkpoints, read by
`original.load_original(path, 'paella', config)` and written by `original.save_original`).

Flax names follow the torch modules (diffusers `src/diffusers/pipelines/wuerstchen/modeling_*.py`),
so each table only turns a Flax path into the torch key: Sequential indices back in
(`channelwise_0` -> `channelwise.0`) and the triplet blocks of the prior flattened into `blocks.{3k + j}`.
"""

import difflib
import re

import jax.numpy as jnp

from wurst_jax.convert.core import Component, register, stack_scan_groups, unstack_scan_groups
from wurst_jax.models.config_fields import read_fields, write_fields
from wurst_jax.models.paella import Paella
from wurst_jax.models.stage_a import VQGAN
from wurst_jax.models.stage_b import WuerstchenDiffNeXt
from wurst_jax.models.stage_c import WuerstchenPrior

_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean', 'var': 'running_var'}


# --- prior ------------------------------------------------------------------------------------


# diffusers WuerstchenPrior's config: `nhead` for num_heads, its defaults where they are not the fields' (which
# are the released v2 prior's), and none of this module's own settings.
_PRIOR_RENAMES = {'num_heads': 'nhead'}
_PRIOR_DEFAULTS = dict(c=1280, c_cond=1024, depth=16, num_heads=16)
_PRIOR_OWN = ('scan_blocks', 'remat_policy', 'pos_embed', 'linear_output', 'dtype')


def _prior_from_config(cfg: dict) -> WuerstchenPrior:
    fields = read_fields(WuerstchenPrior, cfg, skip=_PRIOR_OWN, renames=_PRIOR_RENAMES, defaults=_PRIOR_DEFAULTS)
    return WuerstchenPrior(**fields)


def _prior_config(m: WuerstchenPrior) -> dict:
    if m.pos_embed or m.linear_output:
        raise ValueError(
            'a prior with pos_embed or linear_output has no diffusers WuerstchenPrior equivalent; '
            "keep it in this project's checkpoints"
        )
    return write_fields(m, skip=_PRIOR_OWN, renames=_PRIOR_RENAMES)


def _prior_inputs(m: WuerstchenPrior) -> tuple:
    return (jnp.zeros((1, 8, 8, m.c_in)), jnp.zeros((1,)), jnp.zeros((1, 4, m.c_cond)))


TRIPLET = {'res': 0, 'timestep': 1, 'attn': 2}
BLOCK_MODULES = {
    'channelwise_0': 'channelwise.0',
    'grn': 'channelwise.2',
    'channelwise_4': 'channelwise.4',
    'kv_mapper': 'kv_mapper.1',
    'to_out': 'to_out.0',
}
_PRIOR_MODULES = {**BLOCK_MODULES, 'cond_mapper_0': 'cond_mapper.0', 'cond_mapper_2': 'cond_mapper.2', 'out': 'out.1'}


def _prior_key(m: WuerstchenPrior, path: tuple[str, ...]) -> str:
    _, *names, leaf = path
    parts = []
    for i, name in enumerate(names):
        if name.startswith('blocks_'):
            parts.append(f'blocks.{3 * int(name.split("_")[1]) + TRIPLET[names[i + 1]]}')
        elif name not in TRIPLET:
            parts.append(_PRIOR_MODULES.get(name, name))
    return '.'.join(parts + [_LEAVES.get(leaf, leaf)])


# --- decoder ----------------------------------------------------------------------------------

_DECODER_OWN = ('remat_policy', 'dtype')  # this module's own settings, not in diffusers' config


def _as_tuples(fields: dict) -> dict:
    """JSON lists -> the tuples that the modules' sequence fields hold."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}


def _as_lists(fields: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def _decoder_from_config(cfg: dict) -> WuerstchenDiffNeXt:
    return WuerstchenDiffNeXt(**_as_tuples(read_fields(WuerstchenDiffNeXt, cfg, skip=_DECODER_OWN)))


def _decoder_config(m: WuerstchenDiffNeXt) -> dict:
    return _as_lists(write_fields(m, skip=_DECODER_OWN))


def _decoder_inputs(m: WuerstchenDiffNeXt) -> tuple:
    size = m.patch_size * 2 ** (len(m.c_hidden) - 1)
    return (
        jnp.zeros((1, size, size, m.c_in)),
        jnp.zeros((1,)),
        jnp.zeros((1, 2, 2, m.effnet_embd)),
        jnp.zeros((1, 4, m.clip_embd)),
    )


def _decoder_key(m: WuerstchenDiffNeXt, path: tuple[str, ...]) -> str:
    _, top, *inner, leaf = path
    top = re.sub(r'_(\d+)', r'.\1', top)  # down_blocks_1_0_1 -> down_blocks.1.0.1
    return '.'.join([top] + [BLOCK_MODULES.get(n, n) for n in inner] + [_LEAVES.get(leaf, leaf)])


# --- paella (Würstchen v1 Stage B) ---------------------------------------------------------------

# The official constructor's keyword arguments (dome272/Wuerstchen `modules.py` `Paella.__init__`).
PAELLA_FIELDS = (
    'c_in',
    'c_out',
    'num_labels',
    'c_r',
    'patch_size',
    'c_cond',
    'c_hidden',
    'nhead',
    'blocks',
    'level_config',
    'effnet_embd',
    'byt5_embd',
    'kernel_size',
    'dropout',
    'self_attn',
)


def _paella_from_config(cfg: dict) -> Paella:
    unknown = [k for k in cfg if k not in PAELLA_FIELDS and not k.startswith('_')]  # '_class_name' etc.
    if unknown:
        hints = {k: difflib.get_close_matches(k, PAELLA_FIELDS, n=1) for k in unknown}
        named = ', '.join(f'{k!r}' + (f' (did you mean {h[0]!r}?)' if h else '') for k, h in hints.items())
        raise ValueError(
            f'unknown Paella config field {named}: the fields are the official Paella '
            f"constructor's keyword arguments {list(PAELLA_FIELDS)}"
        )
    return Paella(**_as_tuples({k: v for k, v in cfg.items() if k in PAELLA_FIELDS}))


def _paella_config(m: Paella) -> dict:
    return _as_lists({k: getattr(m, k) for k in PAELLA_FIELDS})


def _paella_inputs(m: Paella) -> tuple:
    size = m.patch_size * 2 ** (len(m.c_hidden) - 1)
    return (
        jnp.zeros((1, size, size), jnp.int32),
        jnp.zeros((1,)),
        jnp.zeros((1, 2, 2, m.effnet_embd)),
        jnp.zeros((1, 4, m.byt5_embd)),
    )


def _paella_key(m: Paella, path: tuple[str, ...]) -> str:
    _, top, *inner, leaf = path
    top = re.sub(r'_(\d+)', r'.\1', top)  # up_blocks_1_0 -> up_blocks.1.0, in_mapper_0 -> in_mapper.0
    leaf = 'weight' if leaf == 'embedding' else _LEAVES.get(leaf, leaf)
    return '.'.join([top] + [BLOCK_MODULES.get(n, n) for n in inner] + [leaf])


# --- vqgan ------------------------------------------------------------------------------------


# diffusers PaellaVQModel's names of two fields; its defaults are the fields'.
_VQGAN_RENAMES = {'num_codes': 'num_vq_embeddings', 'pixel_factor': 'up_down_scale_factor'}


def _vqgan_from_config(cfg: dict) -> VQGAN:
    return VQGAN(**read_fields(VQGAN, cfg, skip=('dtype',), renames=_VQGAN_RENAMES))


def _vqgan_config(m: VQGAN) -> dict:
    return write_fields(m, skip=('dtype',), renames=_VQGAN_RENAMES)


def _vqgan_inputs(m: VQGAN) -> tuple:
    size = m.pixel_factor * 2 ** (m.levels - 1) * 2
    return (jnp.zeros((1, size, size, m.in_channels)),)


_VQ_MIX = {'depthwise': 'depthwise.1', 'channelwise_0': 'channelwise.0', 'channelwise_2': 'channelwise.2'}


def _vqgan_key(m: VQGAN, path: tuple[str, ...]) -> str:
    _, top, *inner, leaf = path
    if top == 'quantizer':
        return 'vquantizer.embedding.weight'
    latent_index = 2 * m.levels - 1  # torch down_blocks: levels mixing blocks + (levels - 1) convs
    head = {
        'in_conv': 'in_block.1',
        'to_latent': f'down_blocks.{latent_index}.0',
        'latent_norm': f'down_blocks.{latent_index}.1',
        'from_latent': 'up_blocks.0.0',
        'out_conv': 'out_block.0',
    }.get(top)
    if top.startswith('down_blocks_'):
        head = f'down_blocks.{int(top.rsplit("_", 1)[1])}'
    elif top.startswith('up_blocks_'):  # torch up_blocks.0 is the latent conv (from_latent here)
        head = f'up_blocks.{int(top.rsplit("_", 1)[1]) + 1}'
    return '.'.join([head] + [_VQ_MIX.get(n, n) for n in inner] + [_LEAVES.get(leaf, leaf)])


register(
    'prior', Component('WuerstchenPrior', 'diffusers', _prior_from_config, _prior_config, _prior_inputs, _prior_key)
)
register(
    'decoder',
    Component('WuerstchenDiffNeXt', 'diffusers', _decoder_from_config, _decoder_config, _decoder_inputs, _decoder_key),
)
register('vqgan', Component('PaellaVQModel', 'diffusers', _vqgan_from_config, _vqgan_config, _vqgan_inputs, _vqgan_key))
register(
    'paella',
    Component(
        'Paella',
        'diffusers',
        _paella_from_config,
        _paella_config,
        _paella_inputs,
        _paella_key,
        stack=stack_scan_groups,
        unstack=unstack_scan_groups,
    ),
)
