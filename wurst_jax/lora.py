"""Low-rank adapters (Hu et al., "LoRA", arXiv:2106.09685, §4.1) for any network of the project.

A target is a dense kernel [.., in, out] (or a 1x1 conv's [.., 1, 1, in, out]; `..` the stacked axis of
scanned blocks) whose parameter path, 'network/module/.../kernel', matches one of `lora.targets`. It
gets `lora_a` [.., in, r] and `lora_b` [.., r, out] beside its kernel, and its module's output gains
(alpha / r) · dropout(x) @ lora_a @ lora_b: peft's LoraLayer (lora_A Kaiming-uniform, lora_B zero, so
the adapted network starts equal to its base). The modules themselves are untouched: `adapted()`
intercepts nn.Dense and nn.Conv calls whose params hold adapters, so every family is covered by its
parameter names alone. `merge` folds adapters into the kernels (sampling, export with --merge).
"""

import contextlib
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from wurst_jax.config_lib import ConfigError

A, B = 'lora_a', 'lora_b'
# Parameter-path patterns by what they adapt; every denoiser's attention is layers.Attention's.
PRESETS = {
    'attention': r'/to_(q|k|v|out)/kernel$',
    # PixArt's feed-forward; the Würstchen ResBlock's channelwise MLP (prior, Stage B, the pixel UViT).
    'feed_forward': r'/(ff_net_\d|channelwise_\d)/kernel$',
    # The 1x1 convs in and out of the Würstchen prior, Stage B and the Stable Cascade UNet, and the effnet
    # (and Stable Cascade's pixel) mappers.
    'conv1x1': r'/(projection|out|embedding_\d|clf_\d|effnet_mappers_\d+|(effnet|pixels)_mapper_\d)/kernel$',
}


def target_patterns(targets: str) -> list[re.Pattern]:
    """`lora.targets`, a comma-separated list of preset names or regular expressions over parameter paths."""
    patterns = []
    for entry in filter(None, (t.strip() for t in targets.split(','))):
        try:
            patterns.append(re.compile(PRESETS.get(entry, entry)))
        except re.error as e:
            raise ConfigError('lora.targets', targets, f'preset names {sorted(PRESETS)} or regular expressions ({e})')
    if not patterns:
        raise ConfigError('lora.targets', targets, f'one or more of {sorted(PRESETS)} or regular expressions')
    return patterns


def scale(config: ml_collections.ConfigDict) -> float:
    return config.lora.alpha / config.lora.rank


def validate(config: ml_collections.ConfigDict) -> None:
    """ConfigError for the first bad field of `config.lora` (rank 0: no adapters, the other fields unused)."""
    lora = config.lora
    if not (isinstance(lora.rank, int) and lora.rank >= 0):
        raise ConfigError('lora.rank', lora.rank, 'an integer >= 0 (0: train the whole network)')
    if not lora.rank:
        if lora.init_from:
            raise ConfigError('lora.init_from', lora.init_from, "empty, or set lora.rank to the file's rank too")
        return
    if lora.init_from and not os.path.exists(lora.init_from):
        raise ConfigError('lora.init_from', lora.init_from, 'an existing LoRA file, or a folder holding one')
    if not lora.alpha > 0:
        raise ConfigError('lora.alpha', lora.alpha, 'a positive number (the branch is scaled by alpha / rank)')
    if not 0 <= lora.dropout < 1:
        raise ConfigError('lora.dropout', lora.dropout, 'a value in [0, 1)')
    if lora.base_dtype not in ('float32', 'bfloat16'):
        raise ConfigError('lora.base_dtype', lora.base_dtype, "one of 'float32', 'bfloat16'")
    target_patterns(lora.targets)


def _path(key: tuple[str, ...]) -> str:
    return '/'.join(key)


def target_kernels(params: Any, targets: str) -> list[tuple[str, ...]]:
    """Flat keys of the kernels `targets` matches in `params` (network name first); an error if none does."""
    patterns = target_patterns(targets)
    keys = [
        k for k in traverse_util.flatten_dict(params) if k[-1] == 'kernel' and any(p.search(_path(k)) for p in patterns)
    ]
    if not keys:
        raise ConfigError(
            'lora.targets',
            targets,
            "patterns that match kernel paths of the trained networks, e.g. 'prior/.*/to_q/kernel'",
        )
    return keys


def init_adapters(rng: jax.Array, boxed_params: Any, config: ml_collections.ConfigDict) -> Any:
    """Adapters for the kernels `config.lora.targets` matches in `boxed_params` (an init's output, with
    logical axes): {key path of the kernel's module: {lora_a, lora_b}}, lora_a taking the kernel's input
    axis name, lora_b its output's, the rank axis replicated."""
    rank, flat = config.lora.rank, traverse_util.flatten_dict(boxed_params)
    out = {}
    for i, key in enumerate(target_kernels(nn.meta.unbox(boxed_params), config.lora.targets)):
        box = flat[key]
        shape = box.value.shape if isinstance(box, nn.Partitioned) else box.shape
        names = box.names if isinstance(box, nn.Partitioned) else (None,) * len(shape)
        fan_in, fan_out = shape[-2], shape[-1]
        if len(shape) >= 4 and shape[-4:-2] != (1, 1):
            raise ConfigError(
                'lora.targets', config.lora.targets, f'dense or 1x1 conv kernels; {_path(key)} is {shape}'
            )
        if rank > min(fan_in, fan_out):
            raise ConfigError(
                'lora.rank', rank, f'at most min(in, out) = {min(fan_in, fan_out)} of the target {_path(key)} {shape}'
            )
        # peft's lora_A init: kaiming_uniform_(a=sqrt(5)), i.e. U(±1/sqrt(fan_in)).
        bound = 1.0 / fan_in**0.5
        a = jax.random.uniform(jax.random.fold_in(rng, i), (*shape[:-1], rank), jnp.float32, -bound, bound)
        b = jnp.zeros((*shape[:-2], rank, fan_out), jnp.float32)
        if isinstance(box, nn.Partitioned):  # the kernel's box type and logical axis names
            a, b = (
                box.replace(value=a, names=(*names[:-1], None)),
                box.replace(value=b, names=(*names[:-2], None, names[-1])),
            )
        out[key[:-1] + (A,)], out[key[:-1] + (B,)] = a, b
    return traverse_util.unflatten_dict(out)


def attach(base: Any, adapters: Any) -> Any:
    """`base` with each adapter pair placed beside the kernel it adapts (what `adapted` reads)."""
    flat = traverse_util.flatten_dict(base)
    for key, value in traverse_util.flatten_dict(adapters).items():
        if key[:-1] + ('kernel',) not in flat:
            raise ValueError(f'adapter {_path(key)} has no kernel {_path(key[:-1])}/kernel in the base')
        flat[key] = value
    return traverse_util.unflatten_dict(flat)


def split(params: Any) -> Any:
    """The adapter leaves of `params` (e.g. gradients of attached params), as init_adapters shapes them."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[-1] in (A, B)})


def merge(base: Any, adapters: Any, lora_scale: float) -> Any:
    """`base` with kernel + scale · lora_a @ lora_b in place of each adapted kernel: the same function."""
    flat, flat_adapters = dict(traverse_util.flatten_dict(base)), traverse_util.flatten_dict(adapters)
    for key, value in flat_adapters.items():
        if key[-1] != A:
            continue
        kernel_key, b = key[:-1] + ('kernel',), flat_adapters[key[:-1] + (B,)]
        kernel = flat[kernel_key]
        delta = jnp.einsum('...ir,...ro->...io', value, b)
        flat[kernel_key] = (kernel + lora_scale * delta.reshape(kernel.shape)).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


@contextlib.contextmanager
def adapted(lora_scale: float, dropout: float = 0.0):
    """Within it, nn.Dense and nn.Conv modules whose params hold lora_a/lora_b add their low-rank branch.
    Dropout on the branch's input (peft's lora_dropout) applies where the module is given a 'dropout'
    rng, i.e. in training steps."""

    def intercept(next_fn, args, kwargs, context):
        module = context.module
        if context.method_name != '__call__' or not isinstance(module, (nn.Dense, nn.Conv)):
            return next_fn(*args, **kwargs)
        if not module.has_variable('params', A):
            return next_fn(*args, **kwargs)
        if isinstance(module, nn.Conv) and (
            tuple(module.kernel_size) != (1, 1) or module.strides not in (1, (1, 1), None)
        ):
            raise ValueError(f'LoRA adapts dense and 1x1 stride-1 convs only; {"/".join(module.scope.path)} is not one')
        y = next_fn(*args, **kwargs)
        x = args[0]
        a, b = module.get_variable('params', A), module.get_variable('params', B)
        if dropout > 0 and module.scope.has_rng('dropout'):
            keep = jax.random.bernoulli(module.make_rng('dropout'), 1 - dropout, x.shape)
            x = jnp.where(keep, x / (1 - dropout), 0).astype(x.dtype)
        dtype = module.dtype or y.dtype
        a = a.reshape(a.shape[-2], a.shape[-1]).astype(dtype)
        b = b.reshape(b.shape[-2], b.shape[-1]).astype(dtype)
        return y + (lora_scale * ((x.astype(dtype) @ a) @ b)).astype(y.dtype)

    with nn.intercept_methods(intercept):
        yield
