"""LoRA adapters (`wurst_jax.lora`) <-> the peft-style state dict diffusers' `load_lora_weights` reads.

A target module M of a pipeline component named PREFIX ('prior' in WuerstchenPriorPipeline) is stored as
`PREFIX.M.lora_A.weight` [r, in(, 1, 1)] and `PREFIX.M.lora_B.weight` [out, r(, 1, 1)], M its torch module
name (the component's own key mapping). Loaders that find no alpha take alpha = r, so the written lora_B
holds (alpha / r) · lora_b: the file is the same function whoever reads it. Reading accepts an `M.alpha`
entry (kohya's) and scales lora_B by alpha / r.
"""

import os
from typing import Any

import flax.linen as nn
import numpy as np
from flax import traverse_util

from wurst_jax import lora
from wurst_jax.convert import core

LORA_WEIGHTS = 'pytorch_lora_weights.safetensors'  # the name load_lora_weights looks for in a folder
_SUFFIX = '.weight'


def read(path: str) -> dict[str, np.ndarray]:
    """The state dict of a LoRA file, or of the LORA_WEIGHTS file in folder `path` (as load_lora_weights
    takes either); a missing or unreadable file is an error naming it."""
    file = os.path.join(path, LORA_WEIGHTS) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f'{path}: no LoRA file (give a .safetensors file, or a folder holding {LORA_WEIGHTS})')
    return core.read_safetensors(file)


def _kernel_path(path: tuple[str, ...]) -> tuple[str, ...]:
    return path[:-1] + ('kernel',)


def to_diffusers(
    module: nn.Module, name: str, base: Any, adapters: Any, scale: float, prefix: str
) -> dict[str, np.ndarray]:
    """The state dict of one network's `adapters` (trained on its params `base`) for component `name`."""
    comp = core.component(name)
    attached = {'params': lora.attach(nn.meta.unbox(base), adapters)}
    flat_module, variables = core.unscanned_variables(module, name, attached)
    flat = traverse_util.flatten_dict(variables)
    state = {}
    for path, a in flat.items():
        if path[-1] != lora.A:
            continue
        kernel = _kernel_path(path)
        target = comp.torch_key(flat_module, kernel).removesuffix(_SUFFIX)
        b = scale * np.asarray(flat[path[:-1] + (lora.B,)], np.float32)
        state[f'{prefix}.{target}.lora_A.weight'] = comp.to_torch(np.asarray(a, np.float32), kernel)
        state[f'{prefix}.{target}.lora_B.weight'] = comp.to_torch(b, kernel)
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def from_diffusers(module: nn.Module, name: str, base: Any, state: dict[str, np.ndarray], prefix: str) -> Any:
    """Adapters (for lora scale 1) of one network from a LoRA state dict's `prefix.` entries; an entry
    naming no module of the network is an error naming it."""
    comp = core.component(name)
    flat_module, variables = core.unscanned_variables(module, name, {'params': nn.meta.unbox(base)})
    flat = dict(traverse_util.flatten_dict(variables))
    modules = {comp.torch_key(flat_module, p).removesuffix(_SUFFIX): p for p in flat if p[-1] == 'kernel'}
    ours = {k.removeprefix(prefix + '.'): v for k, v in state.items() if k.startswith(prefix + '.')}
    targets = sorted({k.removesuffix('.lora_A.weight') for k in ours if k.endswith('.lora_A.weight')})
    if not targets:
        raise ValueError(f'the LoRA file has no {prefix}.*.lora_A.weight entries; its keys start {sorted(state)[:3]}')
    unknown = [t for t in targets if t not in modules or f'{t}.lora_B.weight' not in ours]
    if unknown:
        raise ValueError(f'LoRA entries {unknown[:5]} name no adapted module of this {name} (or lack lora_B)')
    for target in targets:
        kernel = modules[target]
        a = comp.to_flax(np.asarray(ours[f'{target}.lora_A.weight'], np.float32), kernel)
        b = comp.to_flax(np.asarray(ours[f'{target}.lora_B.weight'], np.float32), kernel)
        if f'{target}.alpha' in ours:
            b = b * float(ours[f'{target}.alpha']) / a.shape[-1]
        flat[kernel[:-1] + (lora.A,)], flat[kernel[:-1] + (lora.B,)] = a, b
    return lora.split(core.scanned_variables(module, name, traverse_util.unflatten_dict(flat))['params'])
