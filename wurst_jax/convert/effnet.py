"""Key table of the semantic compressor (`EfficientNetEncoder` of dome272/Wuerstchen `modules.py`;
Stability-AI/StableCascade `modules/effnet.py`).

Torch keys: `backbone.<torchvision efficientnet features keys>` and `mapper.0.weight`,
`mapper.1.{weight,bias,running_mean,running_var}` (no weight/bias when the mapper BN is not affine, as in
Stable Cascade's effnet_encoder.safetensors). The same flat keys are used by Würstchen's `effnet_state_dict`
and by the diffusers research example `EfficientNetEncoder(c_latent=16, c_cond=1280, effnet='efficientnet_v2_s')`.

Flax names mirror them with '_' for '.': `backbone_4_2/block_1/conv` <-> `backbone.4.2.block.1.0`
(ConvNormAct's `conv`/`norm` are torchvision's Sequential indices 0/1).
"""

import jax.numpy as jnp

from wurst_jax.convert.core import Component, register
from wurst_jax.models.effnet import EFFNET_ARCHS, EfficientNetEncoder

_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean', 'var': 'running_var'}
_NAMES = {'conv': '0', 'norm': '1'}
_ARCHS = EFFNET_ARCHS  # the torchvision architectures by their `effnet` name (diffusers' EfficientNetEncoder)


def _from_config(cfg: dict) -> EfficientNetEncoder:
    arch = cfg.get('effnet', 'efficientnet_v2_s')
    if 'stages' in cfg:
        stages = tuple(tuple(s) for s in cfg['stages'])
    elif arch in _ARCHS:
        stages = _ARCHS[arch]
    else:
        raise ValueError(f'unsupported effnet {arch!r}: known {sorted(_ARCHS)} (or give explicit "stages")')
    return EfficientNetEncoder(
        stages=stages,
        last_channels=cfg.get('c_cond', 1280),
        c_latent=cfg.get('c_latent', 16),
        mapper_affine=cfg.get('mapper_affine', True),
        output_scaling=cfg.get('output_scaling', 'none'),
        normalize_input=cfg.get('normalize_input', True),
    )


def _config(m: EfficientNetEncoder) -> dict:
    stages = tuple(tuple(s) for s in m.stages)
    cfg = dict(c_latent=m.c_latent, c_cond=m.last_channels or 4 * stages[-1][5])
    named = [name for name, arch in _ARCHS.items() if arch == stages]
    if named:
        cfg['effnet'] = named[0]
    else:  # not a torchvision architecture: diffusers cannot build it, our from_config can
        cfg['effnet'] = 'custom'
        cfg['stages'] = [list(s) for s in stages]
    cfg.update(mapper_affine=m.mapper_affine, output_scaling=m.output_scaling, normalize_input=m.normalize_input)
    return cfg


def _inputs(m: EfficientNetEncoder) -> tuple:
    return (jnp.zeros((1, 32, 32, 3)),)


def _key(m: EfficientNetEncoder, path: tuple[str, ...]) -> str:
    _, *names, leaf = path
    return '.'.join([_NAMES.get(n, n.replace('_', '.')) for n in names] + [_LEAVES.get(leaf, leaf)])


register('effnet', Component('EfficientNetEncoder', 'diffusers', _from_config, _config, _inputs, _key))
