"""Key table of Stable Cascade's UNet (diffusers `StableCascadeUNet`, Stage C and Stage B), component
'stable_cascade_unet'.

Flax names are diffusers' module paths with dots as underscores, so a key is the Flax path with the
dots put back after the top-level prefix and the block internals renamed as in the Würstchen tables.
The original `stage_c*.safetensors` / `stage_b*.safetensors` files differ from diffusers only in the
joined attention projections (`original.diffusers_names`) and Stage B's `clip_mapper`, which diffusers
calls `clip_txt_pooled_mapper` (diffusers `loaders/single_file_utils.py`
`convert_stable_cascade_unet_single_file_to_diffusers`).
"""

import jax.numpy as jnp
import numpy as np

from wurst_jax.convert.core import Component, register, stack_scan_groups, unstack_scan_groups
from wurst_jax.convert.wuerstchen import BLOCK_MODULES
from wurst_jax.models.config_fields import read_fields, write_fields
from wurst_jax.models.stable_cascade import RELEASED, StableCascadeUNet

_OWN = ('scan_blocks', 'remat_policy', 'dtype')  # this module's own settings, not in diffusers' config
_LEAVES = {'kernel': 'weight', 'scale': 'weight'}
# Top-level modules whose name continues with Sequential / ModuleList indices.
_PREFIXES = (
    'down_downscalers',
    'down_repeat_mappers',
    'down_blocks',
    'up_upscalers',
    'up_repeat_mappers',
    'up_blocks',
    'effnet_mapper',
    'pixels_mapper',
    'embedding',
    'clf',
)


def _tuples(value):
    """JSON lists (nested too) -> the tuples the module's sequence fields hold."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _lists(value):
    return [_lists(v) for v in value] if isinstance(value, tuple) else value


def _from_config(cfg: dict) -> StableCascadeUNet:
    return StableCascadeUNet(**{k: _tuples(v) for k, v in read_fields(StableCascadeUNet, cfg, skip=_OWN).items()})


def _config(m: StableCascadeUNet) -> dict:
    return {k: _lists(v) for k, v in write_fields(m, skip=_OWN).items()}


def _inputs(m: StableCascadeUNet) -> tuple:
    size = m.patch_size * 2 ** (len(m.block_out_channels) - 1)
    stage_c = m.clip_text_in_channels is not None and m.clip_image_in_channels is not None
    return (
        jnp.zeros((1, size, size, m.in_channels)),
        jnp.zeros((1,)),
        jnp.zeros((1, 1, m.clip_text_pooled_in_channels)),
        jnp.zeros((1, 2, m.clip_text_in_channels)) if stage_c else None,
        jnp.zeros((1, 1, m.clip_image_in_channels)) if stage_c else None,
        jnp.zeros((1, 2, 2, m.effnet_in_channels)) if m.effnet_in_channels is not None else None,
    )


def _key(m: StableCascadeUNet, path: tuple[str, ...]) -> str:
    _, top, *inner, leaf = path
    for prefix in _PREFIXES:
        if top.startswith(prefix + '_'):
            top = prefix + '.' + top[len(prefix) + 1 :].replace('_', '.')  # down_blocks_1_3 -> down_blocks.1.3
            break
    return '.'.join([top] + [BLOCK_MODULES.get(n, n) for n in inner] + [_LEAVES.get(leaf, leaf)])


def _diffusers_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An original Stage B file's `clip_mapper` under diffusers' name; other keys as they are."""
    return {
        ('clip_txt_pooled_mapper' + k[len('clip_mapper') :] if k.startswith('clip_mapper.') else k): v
        for k, v in state.items()
    }


def released_fields(state: dict[str, np.ndarray]) -> dict:
    """The released configuration that an original or diffusers state dict holds, told apart as diffusers'
    single-file loader does: Stage C has `clip_txt_mapper` (width 1536: lite), Stage B's level 1 is 576 wide
    in the lite model and 640 in the large one."""
    if 'clip_txt_mapper.weight' in state:
        return dict(RELEASED['stage_c_lite' if state['clip_txt_mapper.weight'].shape[0] == 1536 else 'stage_c'])
    level_1 = state.get('down_blocks.1.0.channelwise.0.weight')
    if level_1 is None:
        raise ValueError(
            'the file holds neither clip_txt_mapper (Stage C) nor down_blocks.1.0.channelwise.0 (Stage B): '
            'it is not a Stable Cascade stage_b*/stage_c* checkpoint'
        )
    return dict(RELEASED['stage_b_lite' if level_1.shape[-1] == 576 else 'stage_b'])


register(
    'stable_cascade_unet',
    Component(
        'StableCascadeUNet',
        'diffusers',
        _from_config,
        _config,
        _inputs,
        _key,
        prepare_state=_diffusers_state,
        stack=stack_scan_groups,
        unstack=unstack_scan_groups,
    ),
)
