"""Generic conversion between torch-named state dicts and Flax variables, and model folders.

A `Component` says how to build the Flax module from a model folder's config.json, the config to
write back, and the torch key of every Flax variable; the tables live in one module per family
(`wuerstchen.py`, `effnet.py`, `clip.py`, `t5.py`, ...) and register themselves here. Tensor layouts follow
the usual torch <-> Flax correspondence: Linear (out, in) <-> Dense (in, out);
Conv (out, in, kh, kw) <-> (kh, kw, in, out); GRN (1, 1, 1, C) <-> (C,). A component with other
layouts passes its own `to_flax` / `to_torch`.
"""

import contextlib
import dataclasses
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

CONFIG_NAME = 'config.json'
DIFFUSERS_WEIGHTS = 'diffusion_pytorch_model.safetensors'
TRANSFORMERS_WEIGHTS = 'model.safetensors'
DIFFUSERS_VERSION = '0.42.1'
TRANSFORMERS_VERSION = '5.23.0'
INDEX_SUFFIX = '.index.json'
_IGNORED_TORCH_SUFFIXES = ('num_batches_tracked',)


def to_flax_layout(array: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    """A torch tensor in the layout of the Flax variable at `path`."""
    if path[-1] == 'kernel' and array.ndim == 2:
        return array.T
    if path[-1] == 'kernel' and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if path[-2:-1] == ('grn',):
        return array.reshape(-1)
    return array


def to_torch_layout(array: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    """Inverse of `to_flax_layout`."""
    if path[-1] == 'kernel' and array.ndim == 2:
        return array.T
    if path[-1] == 'kernel' and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if path[-2:-1] == ('grn',):
        return array.reshape(1, 1, 1, -1)
    return array


@dataclasses.dataclass(frozen=True)
class Component:
    class_name: str  # diffusers `_class_name` or transformers `architectures[0]` of the folder
    library: str  # 'diffusers' or 'transformers': decides the weights file name and config header
    from_config: Callable[[dict], nn.Module]
    to_config: Callable[[nn.Module], dict]
    example_inputs: Callable[[nn.Module], tuple]
    torch_key: Callable[[nn.Module, tuple[str, ...]], str]
    to_flax: Callable[[np.ndarray, tuple[str, ...]], np.ndarray] = to_flax_layout
    to_torch: Callable[[np.ndarray, tuple[str, ...]], np.ndarray] = to_torch_layout
    init_method: str | None = None  # module method that `example_inputs` feed, if not __call__
    accepts: tuple[str, ...] = ()  # further class names a folder may hold (e.g. CLIPTextModel)
    prepare_state: Callable[[dict], dict] | None = None  # renames/drops file keys before matching
    keep_key: Callable[[str], bool] | None = None  # file keys to read (None: all); others are never loaded
    check_state: Callable[[nn.Module, dict], None] | None = None  # checks a file's non-weight tensors
    # With scan_blocks: the unscanned module's variables -> the scanned module's, and back (default: the
    # prior's blocks_0..blocks_{depth-1} <-> one stacked 'blocks').
    stack: Callable[[nn.Module, dict], dict] | None = None
    unstack: Callable[[nn.Module, dict], dict] | None = None

    @property
    def weights_name(self) -> str:
        return TRANSFORMERS_WEIGHTS if self.library == 'transformers' else DIFFUSERS_WEIGHTS

    @property
    def index_name(self) -> str:
        """The index of a sharded save (save_pretrained with max_shard_size): which shard holds each key."""
        return self.weights_name + INDEX_SUFFIX


COMPONENTS: dict[str, Component] = {}
_SHAPES_ONLY = False


@contextlib.contextmanager
def shapes_only():
    """Within it, `load_folder` reads only a model folder's config.json and returns the variables
    as ShapeDtypeStructs: what an ahead-of-time plan (`wurst_jax.plan`) of a run with big frozen
    networks needs, without their weights on disk or in memory."""
    global _SHAPES_ONLY
    previous, _SHAPES_ONLY = _SHAPES_ONLY, True
    try:
        yield
    finally:
        _SHAPES_ONLY = previous


def reading_shapes_only() -> bool:
    """Whether a `shapes_only()` block is open: what stands for data is then any value of its shape."""
    return _SHAPES_ONLY


def register(name: str, component: Component) -> None:
    COMPONENTS[name] = component


def component(name: str) -> Component:
    if name not in COMPONENTS:
        raise ValueError(f'unknown component {name!r}: valid components are {sorted(COMPONENTS)}')
    return COMPONENTS[name]


def _unscanned(module: nn.Module) -> nn.Module:
    return module.clone(scan_blocks=False) if getattr(module, 'scan_blocks', False) else module


def abstract_variables(module: nn.Module, comp: Component) -> dict:
    method = getattr(type(module), comp.init_method) if comp.init_method else None
    shapes = jax.eval_shape(lambda k: module.init(k, *comp.example_inputs(module), method=method), jax.random.key(0))
    return nn.meta.unbox(shapes)


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


def stack_scan_groups(module: nn.Module, variables: dict) -> dict:
    """Unscanned variables (`up_blocks_1_3`, ...) -> those of the scan_blocks module, whose `scan_groups()`
    lists (scan module name, torch prefix, first torch index, repeats, blocks per repeat): the groups'
    blocks `block_k` stacked on a leading axis."""
    params = dict(variables['params'])
    for scan_name, prefix, first, repeats, per in module.scan_groups():
        params[scan_name] = {
            f'block_{k}': jax.tree.map(
                lambda *xs: np.stack(xs), *[params.pop(f'{prefix}_{first + g * per + k}') for g in range(repeats)]
            )
            for k in range(per)
        }
    return {**variables, 'params': params}


def unstack_scan_groups(module: nn.Module, variables: dict) -> dict:
    """Inverse of `stack_scan_groups`."""
    params = dict(variables['params'])
    for scan_name, prefix, first, repeats, per in module.scan_groups():
        stacked = params.pop(scan_name)
        for g in range(repeats):
            for k in range(per):
                params[f'{prefix}_{first + g * per + k}'] = jax.tree.map(lambda x: x[g], stacked[f'block_{k}'])
    return {**variables, 'params': params}


def variables_from_state_dict(module: nn.Module, name: str, state: dict[str, np.ndarray]) -> dict:
    """Flax variables of `module` from a torch-named state dict; every missing, unexpected or
    wrongly shaped tensor is named in one error."""
    comp = component(name)
    if comp.check_state is not None:
        comp.check_state(module, state)
    if comp.prepare_state is not None:
        state = comp.prepare_state(state)
    flat_module = _unscanned(module)
    abstract = traverse_util.flatten_dict(abstract_variables(flat_module, comp))
    out, missing, mismatched, used = {}, [], [], set()
    for path, leaf in abstract.items():
        key = comp.torch_key(flat_module, path)
        if key not in state:
            missing.append(key)
            continue
        used.add(key)
        array = comp.to_flax(np.asarray(state[key]), path)
        if array.shape != leaf.shape:
            mismatched.append(f'{key}: file {tuple(state[key].shape)}, model expects {leaf.shape} (flax layout)')
            continue
        out[path] = array.astype(leaf.dtype)
    unexpected = sorted(k for k in state if k not in used and not k.endswith(_IGNORED_TORCH_SUFFIXES))
    if missing or unexpected or mismatched:
        raise ValueError(
            f'{name} weights do not match the module: missing {missing}, '
            f'unexpected {unexpected}, wrong shape {mismatched}'
        )
    return scanned_variables(module, name, traverse_util.unflatten_dict(out))


def unscanned_variables(module: nn.Module, name: str, variables: dict) -> tuple[nn.Module, dict]:
    """(the module without scan_blocks, its variables): a scanned module's stacked blocks split per block."""
    flat_module = _unscanned(module)
    if flat_module is module:
        return module, variables
    comp, variables = component(name), nn.meta.unbox(variables)
    return flat_module, comp.unstack(module, variables) if comp.unstack else _unstack_blocks(variables, module.depth)


def scanned_variables(module: nn.Module, name: str, variables: dict) -> dict:
    """Inverse of `unscanned_variables`: the unscanned module's variables stacked as `module` holds them."""
    if _unscanned(module) is module:
        return variables
    comp = component(name)
    return comp.stack(module, variables) if comp.stack else _stack_blocks(variables, module.depth)


def state_dict_from_variables(module: nn.Module, name: str, variables: dict) -> dict[str, np.ndarray]:
    """The torch-named state dict (diffusers/transformers layout) of Flax variables."""
    comp = component(name)
    flat_module, variables = unscanned_variables(module, name, variables)
    flat = traverse_util.flatten_dict(nn.meta.unbox(variables))
    return {
        comp.torch_key(flat_module, path): np.ascontiguousarray(comp.to_torch(np.asarray(v, np.float32), path))
        for path, v in flat.items()
    }


def read_safetensors(path: str, keep: Callable[[str], bool] | None = None) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (those whose key `keep` accepts; None: all); a truncated or
    corrupt file is an error naming it."""
    try:
        if keep is None:
            return load_file(path)
        with safe_open(path, framework='np') as f:
            return {key: f.get_tensor(key) for key in f.keys() if keep(key)}
    except SafetensorError as e:
        raise ValueError(
            f'{path} is not a readable safetensors file ({e}): it is truncated or corrupt, download or convert it again'
        ) from None


def read_weights(path: str, name: str) -> dict[str, np.ndarray]:
    """The state dict of a model folder: its one weights file, else the shards its index names (only
    the shards that hold keys the component keeps are opened)."""
    comp = component(name)
    single = os.path.join(path, comp.weights_name)
    if os.path.isfile(single):
        return read_safetensors(single, comp.keep_key)
    index_path = os.path.join(path, comp.index_name)
    weight_map = read_json(index_path).get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f'{index_path} has no weight_map (key -> shard file): save the model again')
    keep = comp.keep_key or (lambda key: True)
    shards = sorted({shard for key, shard in weight_map.items() if keep(key)})
    missing = [shard for shard in shards if not os.path.isfile(os.path.join(path, shard))]
    if missing:
        raise FileNotFoundError(f'{index_path} names shards that are not in {path}: {missing}')
    state = {}
    for shard in shards:
        state.update(read_safetensors(os.path.join(path, shard), keep))
    return state


def read_json(path: str) -> dict:
    """A model folder's JSON file; an unreadable one is an error naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}): restore the model folder's {os.path.basename(path)}"
        ) from None


def read_class_name(path: str) -> str | None:
    """The class a model folder's config.json names (diffusers `_class_name` or transformers
    `architectures[0]`); None for a file or a folder without config.json."""
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        return None
    config = read_json(config_path)
    return config.get('_class_name') or (config.get('architectures') or [None])[0]


def read_config(path: str, name: str) -> dict:
    """config.json of a model folder, checked to hold the class that `name` converts."""
    comp = component(name)
    config_path, weights_path = os.path.join(path, CONFIG_NAME), os.path.join(path, comp.weights_name)
    sharded = os.path.isfile(os.path.join(path, comp.index_name))
    for needed in (config_path,) if _SHAPES_ONLY or sharded else (config_path, weights_path):
        if not os.path.isfile(needed):
            raise FileNotFoundError(
                f'{needed} not found: {name} expects a {comp.library} model folder '
                f'with {CONFIG_NAME} and {comp.weights_name} (or sharded weights '
                f'with {comp.index_name})'
            )
    config = read_json(config_path)
    found = read_class_name(path)
    if found is not None and found not in (comp.class_name, *comp.accepts):
        raise ValueError(
            f'{config_path} is a {found}, but component {name!r} is a {" or ".join((comp.class_name, *comp.accepts))}'
        )
    return config


def load_folder(path: str, name: str, **module_overrides: Any) -> tuple[nn.Module, dict]:
    """(module configured from path/config.json, Flax variables) from a local diffusers or
    transformers model folder.

    module_overrides set Flax-only options, e.g. scan_blocks=True or dtype=jnp.bfloat16. Within
    `shapes_only()` a folder needs only its config.json and the variables are ShapeDtypeStructs.
    """
    comp = component(name)
    module = comp.from_config(read_config(path, name))
    if module_overrides:
        module = module.clone(**module_overrides)
    if _SHAPES_ONLY:
        return module, abstract_variables(module, comp)
    return module, variables_from_state_dict(module, name, read_weights(path, name))


def write_config(module: nn.Module, path: str, name: str) -> None:
    """Writes path/config.json of `module` as diffusers/transformers expect it (what `shapes_only` reads)."""
    comp = component(name)
    os.makedirs(path, exist_ok=True)
    if comp.library == 'transformers':
        header = {'architectures': [comp.class_name], 'transformers_version': TRANSFORMERS_VERSION}
    else:
        header = {'_class_name': comp.class_name, '_diffusers_version': DIFFUSERS_VERSION}
    with open(os.path.join(path, CONFIG_NAME), 'w') as f:
        json.dump({**header, **comp.to_config(module)}, f, indent=2)


def save_diffusers(module: nn.Module, variables: dict, path: str, name: str) -> None:
    """Writes a model folder (config.json + safetensors) that diffusers/transformers from_pretrained loads."""
    comp = component(name)
    write_config(module, path, name)
    metadata = {'format': 'pt'} if comp.library == 'transformers' else None
    save_file(
        state_dict_from_variables(module, name, variables), os.path.join(path, comp.weights_name), metadata=metadata
    )
