"""The original checkpoints: dome272/Wuerstchen `.pt` files and Stable Cascade `.safetensors` files.

Their tensors carry the torch module names of the original code, which differ from diffusers' only
in the attention (one `in_proj` for q/k/v, `out_proj`) and the VQ codebook name (diffusers
`scripts/convert_wuerstchen.py`). A `.pt` is a dict of state dicts, read with `torch.load(weights_only=True)`; which
entry holds the network depends on the file:

  model_v3_stage_c.pt / model_stage_c.pt   prior     'ema_state_dict' (what diffusers converted)
  model_v2_stage_b.pt                      decoder   'state_dict';  effnet 'effnet_state_dict'
  model_stage_b.pt (Würstchen v1)          paella    'state_dict';  effnet 'effnet_state_dict' (EfficientNetV2-L)
  vqgan_f4_v1_500k.pt                      vqgan     'state_dict'
  stage_a.safetensors (Stable Cascade)     vqgan     flat (decode scale 0.43 there: pass it in config)
  effnet_encoder.safetensors (SC)          effnet    flat (mapper BatchNorm without affine, read off the file)
  PixArt-XL-2-*.pth (PixArt-alpha)         pixart    'state_dict_ema' or 'state_dict' (names: convert/pixart.py)

  stage_c*.safetensors (SC, _lite, _bf16)  stable_cascade_unet   flat (released size read off the file)
  stage_b*.safetensors (SC, _lite, _bf16)  stable_cascade_unet   flat

`save_original` writes Flax variables back as a flat
`.safetensors` state dict in the original names (what the official modules' load_state_dict takes).
"""

import os
import pickle

import flax.linen as nn
import numpy as np
from safetensors.numpy import save_file

from wurst_jax.convert import core, pixart, stable_cascade

# The released Würstchen v2 networks; `config` arguments override single fields.
RELEASED_CONFIGS = {
    'prior': dict(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24, dropout=0.1),
    'decoder': {},  # the WuerstchenDiffNeXt defaults are the released decoder
    'vqgan': {},
    'effnet': {},
    # Würstchen v1's Stage B: train_stage_B.py builds `Paella(byt5_embd=1024)` (CLIP-H text states); the other
    # fields are the official constructor's defaults, which the Flax Paella's are.
    'paella': dict(byt5_embd=1024),
}
_ENTRIES = {
    'prior': ('ema_state_dict', 'state_dict'),
    'decoder': ('state_dict',),
    'effnet': ('effnet_state_dict',),
    'vqgan': ('state_dict',),
    'paella': ('state_dict',),
    'pixart': ('state_dict_ema', 'state_dict'),  # PixArt's training saves both; released files hold state_dict
}
_HINTS = {  # what a file lacking the entry was expected to be
    'paella': 'a Würstchen v1 Stage B checkpoint (dome272/Wuerstchen train_stage_B.py saves the Paella generator '
    "as 'state_dict' and its EfficientNet as 'effnet_state_dict')",
    'decoder': "a Würstchen v2 Stage B checkpoint (model_v2_stage_b.pt: the DiffNeXt as 'state_dict')",
    'effnet': 'a Würstchen Stage B checkpoint (train_stage_B.py saves the jointly trained EfficientNet as '
    "'effnet_state_dict'), or a flat effnet .safetensors",
}
_TORCH_SUFFIXES = ('.pt', '.pth', '.ckpt', '.bin')
# Components whose original names are the diffusers ones but for the attention and codebook (`diffusers_names`).
_WUERSTCHEN = ('prior', 'decoder', 'vqgan', 'effnet', 'paella')


def _read_torch(path: str) -> dict:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f'reading {path} needs PyTorch (pip install torch); safetensors files do not') from e
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        first_line = str(e).strip().splitlines()[0]
        raise ValueError(
            f'{path} cannot be read by torch.load ({type(e).__name__}: {first_line}): it is truncated '
            'or corrupt, download it again'
        ) from None


def read_checkpoint(path: str, component: str) -> dict[str, np.ndarray]:
    """The flat, torch-named state dict of `component` in an original checkpoint file."""
    if path.endswith('.safetensors'):
        return core.read_safetensors(path)
    if not path.endswith(_TORCH_SUFFIXES):
        raise ValueError(f'{path}: expected a .safetensors or .pt/.pth/.ckpt/.bin checkpoint file')
    content = _read_torch(path)
    if isinstance(content, dict) and not any(hasattr(v, 'shape') for v in content.values()):
        for entry in _ENTRIES.get(component, ('state_dict',)):
            if entry in content:
                content = content[entry]
                break
        else:
            expected = f': expected {_HINTS[component]}' if component in _HINTS else ''
            raise KeyError(
                f'{path} has no {" or ".join(_ENTRIES[component])} entry for {component}: '
                f'it holds {sorted(content)}{expected}'
            )
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in content.items()}


# The key parts renamed besides the joined q/k/v: original -> diffusers spelling, and back.
_TO_DIFFUSERS = {
    '.attention.attn.out_proj.': '.attention.to_out.0.',
    'vquantizer.codebook.weight': 'vquantizer.embedding.weight',
}
_TO_ORIGINAL = {new: old for old, new in _TO_DIFFUSERS.items()}
_QKV = ('to_q', 'to_k', 'to_v')


def _renamed(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if old in key:
            return key.replace(old, new)
    return key


def diffusers_names(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Original key names -> diffusers key names (split q/k/v, out_proj, codebook)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix('module.').removeprefix('_orig_mod.')  # DDP / torch.compile wrappers
        if '.attention.attn.in_proj_' in key:
            prefix, leaf = key.split('.attention.attn.in_proj_')
            for name, part in zip(_QKV, np.split(value, 3, axis=0)):
                out[f'{prefix}.attention.{name}.{leaf}'] = part
        else:
            out[_renamed(key, _TO_DIFFUSERS)] = value
    return out


def original_names(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of `diffusers_names`: q/k/v joined into `attention.attn.in_proj_*`, `out_proj`, `codebook`."""
    out, qkv = {}, {}
    for key, value in state.items():
        if any(f'.attention.{n}.' in key for n in _QKV):
            prefix, rest = key.split('.attention.', 1)
            name, leaf = rest.split('.', 1)
            qkv.setdefault((prefix, leaf), {})[name] = value
        else:
            out[_renamed(key, _TO_ORIGINAL)] = value
    for (prefix, leaf), parts in qkv.items():
        out[f'{prefix}.attention.attn.in_proj_{leaf}'] = np.concatenate([parts[n] for n in _QKV])
    return out


def save_original(module: nn.Module, variables: dict, path: str, component: str) -> None:
    """Writes `variables` of a Würstchen component as a flat `.safetensors` state dict in the original module
    names (dome272/Wuerstchen `modules.py`, `vqgan.py`): the official module's load_state_dict(strict=True)
    takes it (the BatchNorms' num_batches_tracked aside), and `load_original(path, component, config)` reads
    it back bit for bit. A scan_blocks module is written unscanned, as the torch modules are."""
    if component not in _WUERSTCHEN:
        raise ValueError(
            f'save_original writes the Würstchen components {list(_WUERSTCHEN)}, not {component!r}: '
            'use save_diffusers for a diffusers folder'
        )
    if not path.endswith('.safetensors'):
        raise ValueError(f'{path}: save_original writes a .safetensors file (torch.load-free); name it *.safetensors')
    state = original_names(core.state_dict_from_variables(module, component, variables))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)


def load_original(path: str, component: str, config: dict | None = None, **module_overrides) -> tuple[nn.Module, dict]:
    """(module, Flax variables) from an original checkpoint file.

    The module is the released Würstchen v2 network of `component`, with `config` (diffusers
    config fields, e.g. {'c_cond': 1024} for the v1 prior) overriding its fields.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} not found: expected an original {component} checkpoint file')
    comp = core.component(component)
    state = diffusers_names(read_checkpoint(path, component))
    released, config = RELEASED_CONFIGS.get(component, {}), config or {}
    fields = _fields_of_file(component, state, {**released, **config})
    module = comp.from_config({**released, **fields, **config})
    if module_overrides:
        module = module.clone(**module_overrides)
    return module, core.variables_from_state_dict(module, component, state)


def _fields_of_file(component: str, state: dict[str, np.ndarray], config: dict) -> dict:
    """Config fields that the released files of one component differ in, read off the tensors."""
    if component == 'pixart':  # all of its architecture but the head count
        return pixart.original_fields(state, config.get('num_attention_heads', 16))
    if component == 'effnet':  # Würstchen's mapper BatchNorm is affine, Stable Cascade's (affine=False) is not
        fields = {'mapper_affine': 'mapper.1.weight' in state}
        # torchvision's features: stem, the stages, the head conv. V2-S has 6 stages (head backbone.7), V2-L 7
        # (head backbone.8; Würstchen v1's train_stage_B.py). A config's 'stages' overrides this.
        if 'backbone.8.0.weight' in state and 'backbone.9.0.weight' not in state:
            fields['effnet'] = 'efficientnet_v2_l'
        return fields
    if component == 'stable_cascade_unet':
        return stable_cascade.released_fields(state)
    return {}
