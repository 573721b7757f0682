"""Table-driven conversion between diffusers state dicts and Flax variables.

Each component names how to build the module from a diffusers config.json, the config to write
back, and the torch key of every Flax variable. Tensor layouts follow wuerstchen.md §10: Linear
(out, in) <-> Dense (in, out); Conv (out, in, kh, kw) <-> (kh, kw, in, out); GRN (1, 1, 1, C) <-> (C,).
"""
import dataclasses
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from wurst_jax.models.stage_a import VQGAN
from wurst_jax.models.stage_c import WuerstchenPrior

WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
CONFIG_NAME = 'config.json'
DIFFUSERS_VERSION = '0.42.1'


# --- prior ------------------------------------------------------------------------------------

def _prior_from_config(cfg: dict) -> WuerstchenPrior:
    return WuerstchenPrior(c_in=cfg.get('c_in', 16), c=cfg.get('c', 1280), c_cond=cfg.get('c_cond', 1024),
                           c_r=cfg.get('c_r', 64), depth=cfg.get('depth', 16), num_heads=cfg.get('nhead', 16),
                           dropout=cfg.get('dropout', 0.1))


def _prior_config(m: WuerstchenPrior) -> dict:
    return dict(c_in=m.c_in, c=m.c, c_cond=m.c_cond, c_r=m.c_r, depth=m.depth, nhead=m.num_heads,
                dropout=m.dropout)


def _prior_inputs(m: WuerstchenPrior) -> tuple:
    return (jnp.zeros((1, 8, 8, m.c_in)), jnp.zeros((1,)), jnp.zeros((1, 4, m.c_cond)))


_PRIOR_BLOCK = {'res': 0, 'timestep': 1, 'attn': 2}
_PRIOR_MODULES = {'channelwise_0': 'channelwise.0', 'grn': 'channelwise.2', 'channelwise_4': 'channelwise.4',
                  'kv_mapper': 'kv_mapper.1', 'to_out': 'to_out.0', 'cond_mapper_0': 'cond_mapper.0',
                  'cond_mapper_2': 'cond_mapper.2', 'out': 'out.1'}


def _prior_key(m: WuerstchenPrior, path: tuple[str, ...]) -> str:
    collection, *names, leaf = path
    parts = []
    for name in names:
        if name.startswith('blocks_'):
            k = int(name.split('_')[1])
            parts.append(f'blocks.{3 * k + _PRIOR_BLOCK[names[names.index(name) + 1]]}')
        elif name not in _PRIOR_BLOCK:
            parts.append(_PRIOR_MODULES.get(name, name))
    return '.'.join(parts + [{'kernel': 'weight'}.get(leaf, leaf)])


# --- vqgan ------------------------------------------------------------------------------------

def _vqgan_from_config(cfg: dict) -> VQGAN:
    return VQGAN(levels=cfg.get('levels', 2), embed_dim=cfg.get('embed_dim', 384),
                 bottleneck_blocks=cfg.get('bottleneck_blocks', 12), latent_channels=cfg.get('latent_channels', 4),
                 num_codes=cfg.get('num_vq_embeddings', 8192), scale_factor=cfg.get('scale_factor', 0.3764),
                 in_channels=cfg.get('in_channels', 3), out_channels=cfg.get('out_channels', 3),
                 pixel_factor=cfg.get('up_down_scale_factor', 2))


def _vqgan_config(m: VQGAN) -> dict:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, up_down_scale_factor=m.pixel_factor,
                levels=m.levels, bottleneck_blocks=m.bottleneck_blocks, embed_dim=m.embed_dim,
                latent_channels=m.latent_channels, num_vq_embeddings=m.num_codes, scale_factor=m.scale_factor)


def _vqgan_inputs(m: VQGAN) -> tuple:
    size = m.pixel_factor * 2 ** (m.levels - 1) * 2
    return (jnp.zeros((1, size, size, m.in_channels)),)


_VQ_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean', 'var': 'running_var'}
_VQ_MIX = {'depthwise': 'depthwise.1', 'channelwise_0': 'channelwise.0', 'channelwise_2': 'channelwise.2'}


def _vqgan_key(m: VQGAN, path: tuple[str, ...]) -> str:
    collection, top, *inner, leaf = path
    latent_index = 2 * m.levels - 1  # torch down_blocks: levels mixing blocks + (levels - 1) convs
    head = {'in_conv': 'in_block.1', 'to_latent': f'down_blocks.{latent_index}.0',
            'latent_norm': f'down_blocks.{latent_index}.1', 'quantizer': 'vquantizer',
            'from_latent': 'up_blocks.0.0', 'out_conv': 'out_block.0'}.get(top)
    if top.startswith('down_blocks_'):
        head = f'down_blocks.{int(top.rsplit("_", 1)[1])}'
    elif top.startswith('up_blocks_'):  # torch up_blocks.0 is the latent conv (from_latent here)
        head = f'up_blocks.{int(top.rsplit("_", 1)[1]) + 1}'
    if top == 'quantizer':
        return 'vquantizer.embedding.weight'
    return '.'.join([head] + [_VQ_MIX.get(n, n) for n in inner] + [_VQ_LEAVES.get(leaf, leaf)])


# --- generic machinery ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Component:
    diffusers_class: str
    from_config: Callable[[dict], nn.Module]
    to_config: Callable[[nn.Module], dict]
    example_inputs: Callable[[nn.Module], tuple]
    torch_key: Callable[[nn.Module, tuple[str, ...]], str]


COMPONENTS = {
    'prior': Component('WuerstchenPrior', _prior_from_config, _prior_config, _prior_inputs, _prior_key),
    'vqgan': Component('PaellaVQModel', _vqgan_from_config, _vqgan_config, _vqgan_inputs, _vqgan_key),
}
_IGNORED_TORCH_SUFFIXES = ('num_batches_tracked',)


def _component(name: str) -> Component:
    if name not in COMPONENTS:
        raise ValueError(f'unknown component {name!r}: valid components are {sorted(COMPONENTS)}')
    return COMPONENTS[name]


def _unscanned(module: nn.Module) -> nn.Module:
    return module.clone(scan_blocks=False) if getattr(module, 'scan_blocks', False) else module


def _abstract_variables(module: nn.Module, comp: Component) -> dict:
    shapes = jax.eval_shape(lambda k: module.init(k, *comp.example_inputs(module)), jax.random.key(0))
    return nn.meta.unbox(shapes)


def _to_flax(array: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    if path[-1] == 'kernel' and array.ndim == 2:
        array = array.T
    elif path[-1] == 'kernel' and array.ndim == 4:
        array = array.transpose(2, 3, 1, 0)
    elif path[-2:-1] == ('grn',):
        array = array.reshape(-1)
    return array


def _to_torch(array: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    if path[-1] == 'kernel' and array.ndim == 2:
        return array.T
    if path[-1] == 'kernel' and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if path[-2:-1] == ('grn',):
        return array.reshape(1, 1, 1, -1)
    return array


def _stack_blocks(variables: dict, depth: int) -> dict:
    """Unscanned blocks_0..blocks_{depth-1} -> one 'blocks' entry with a leading layer axis."""
    params = dict(variables['params'])
    blocks = [params.pop(f'blocks_{k}') for k in range(depth)]
    params['blocks'] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    return {**variables, 'params': params}


def _unstack_blocks(variables: dict, depth: int) -> dict:
    params = dict(variables['params'])
    blocks = params.pop('blocks')
    for k in range(depth):
        params[f'blocks_{k}'] = jax.tree.map(lambda x: x[k], blocks)
    return {**variables, 'params': params}


def variables_from_state_dict(module: nn.Module, component: str, state: dict[str, np.ndarray]) -> dict:
    """Flax variables of `module` from a torch-named state dict; every missing, unexpected or
    wrongly shaped tensor is named in one error."""
    comp = _component(component)
    flat_module = _unscanned(module)
    abstract = traverse_util.flatten_dict(_abstract_variables(flat_module, comp))
    out, missing, mismatched, used = {}, [], [], set()
    for path, leaf in abstract.items():
        key = comp.torch_key(flat_module, path)
        if key not in state:
            missing.append(key)
            continue
        used.add(key)
        array = _to_flax(np.asarray(state[key]), path)
        if array.shape != leaf.shape:
            mismatched.append(f'{key}: file {tuple(state[key].shape)}, model expects {leaf.shape} (flax layout)')
            continue
        out[path] = array.astype(leaf.dtype)
    unexpected = sorted(k for k in state if k not in used and not k.endswith(_IGNORED_TORCH_SUFFIXES))
    if missing or unexpected or mismatched:
        raise ValueError(f'{component} weights do not match the module: missing {missing}, '
                         f'unexpected {unexpected}, wrong shape {mismatched}')
    variables = traverse_util.unflatten_dict(out)
    if flat_module is not module:
        variables = _stack_blocks(variables, module.depth)
    return variables


def state_dict_from_variables(module: nn.Module, component: str, variables: dict) -> dict[str, np.ndarray]:
    """The torch-named state dict (diffusers layout) of Flax variables."""
    comp = _component(component)
    flat_module = _unscanned(module)
    if flat_module is not module:
        variables = _unstack_blocks(variables, module.depth)
    flat = traverse_util.flatten_dict(nn.meta.unbox(variables))
    return {comp.torch_key(flat_module, path): np.ascontiguousarray(_to_torch(np.asarray(v, np.float32), path))
            for path, v in flat.items()}


def load_diffusers(path: str, component: str, **module_overrides: Any) -> tuple[nn.Module, dict]:
    """(module configured from path/config.json, Flax variables) from a local diffusers model folder.

    module_overrides set Flax-only options, e.g. scan_blocks=True or dtype=jnp.bfloat16.
    """
    comp = _component(component)
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for needed in (config_path, weights_path):
        if not os.path.isfile(needed):
            raise FileNotFoundError(f'{needed} not found: {component} expects a diffusers model folder '
                                    f'with {CONFIG_NAME} and {WEIGHTS_NAME}')
    with open(config_path) as f:
        config = json.load(f)
    if config.get('_class_name', comp.diffusers_class) != comp.diffusers_class:
        raise ValueError(f'{config_path} is a {config["_class_name"]}, but component {component!r} '
                         f'is a {comp.diffusers_class}')
    module = comp.from_config(config)
    if module_overrides:
        module = module.clone(**module_overrides)
    return module, variables_from_state_dict(module, component, load_file(weights_path))


def save_diffusers(module: nn.Module, variables: dict, path: str, component: str) -> None:
    """Writes a diffusers model folder (config.json + safetensors) that from_pretrained loads."""
    comp = _component(component)
    os.makedirs(path, exist_ok=True)
    config = {'_class_name': comp.diffusers_class, '_diffusers_version': DIFFUSERS_VERSION,
              **comp.to_config(module)}
    with open(os.path.join(path, CONFIG_NAME), 'w') as f:
        json.dump(config, f, indent=2)
    save_file(state_dict_from_variables(module, component, variables), os.path.join(path, WEIGHTS_NAME))
