"""Greedy growing (Vasconcelos et al., 2024): a trained core, built into a higher-resolution UNet.

A `pixel` run with `grow.from_workdir` starts from another pixel run's EMA params: the text encoder,
the `core` and every encoder/decoder level the source already had are copied bit for bit
(`carried_modules`); the source's shallow `entry`/`encoder`/`decoder`/`exit` (or, for a grown source,
its full-resolution `entry`/`exit`) are discarded, as the paper discards the shallow layers; the new
outer levels and the new entry/exit start from their init. Growing again (16 → 32 → 64 px) keeps the
levels grown before and adds the next one outward (`models/shallow_uvit.py` names levels from the core).

`grow.phase` 1 trains only the new layers: `freeze` routes the carried params to `optax.set_to_zero`,
so they are bit-identical after any number of steps (and so is their EMA, see `train_state.ema_update`),
and the task differentiates through `stop_frozen_gradients`, so the compiled step computes no weight
gradient for them (XLA drops that work); gradients still flow through the frozen core into the new
encoder levels. Phase 2 trains everything: grown from the core directly, or continuing a phase-1 run
(`grow.from_workdir` names a run of the same UNet, every param of which is carried).
"""

from typing import Any

import jax
import ml_collections
import optax

from wurst_jax import checkpoint
from wurst_jax.config_lib import ConfigError

FAMILY = 'pixel'
# Core fields that must agree for the source's core params to be this model's core params.
CORE_FIELDS = ('c', 'depth', 'num_heads', 'c_r')


def core_grid(config: ml_collections.ConfigDict) -> int:
    """Side of the grid the core runs on: the image side over the patch size or over 2^levels."""
    levels = len(config.model.level_channels)
    return config.input.image_size // (2**levels if levels else config.model.patch_size)


def carried_modules(source_config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The denoiser's top-level modules a model grown from `source_config`'s run takes over."""
    levels = range(len(source_config.model.level_channels))
    return ('core',) + tuple(f'{part}_{k}' for k in levels for part in ('encoder', 'down', 'up', 'decoder'))


def continues(config: ml_collections.ConfigDict, source_config: ml_collections.ConfigDict) -> bool:
    """Whether `config` builds the source run's own UNet (phase 2 after phase 1) rather than growing it."""
    levels = tuple(config.model.level_channels)
    return bool(levels) and tuple(source_config.model.level_channels) == levels


def check_growable(config: ml_collections.ConfigDict, source_config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError (field grow.from_workdir) unless `config`'s model can be grown from the source run."""
    source = config.grow.from_workdir
    if source_config.get('model_family') != FAMILY:
        raise ConfigError(
            'grow.from_workdir',
            source,
            f"a workdir of a '{FAMILY}' run; it holds a {source_config.get('model_family')!r} run",
        )
    for field in CORE_FIELDS:
        if source_config.model[field] != config.model[field]:
            raise ConfigError(
                'grow.from_workdir',
                source,
                f'a run whose core has model.{field}={config.model[field]} like this one; '
                f'it has {source_config.model[field]}',
            )
    if source_config.text.to_json(sort_keys=True) != config.text.to_json(sort_keys=True):  # tuples vs JSON lists
        raise ConfigError(
            'grow.from_workdir',
            source,
            'a run with the same text encoder config (config.text), since the encoder is carried with the core',
        )
    source_levels, levels = tuple(source_config.model.level_channels), tuple(config.model.level_channels)
    if continues(config, source_config):
        if config.grow.phase != 2:
            raise ConfigError(
                'grow.phase',
                config.grow.phase,
                '2: the source run has this UNet already, so phase 1 would freeze all of it',
            )
        return
    if len(levels) <= len(source_levels) or levels[: len(source_levels)] != source_levels:
        raise ConfigError(
            'model.level_channels',
            levels,
            f"the source run's levels {source_levels} followed by at least one new level",
        )
    if core_grid(source_config) != core_grid(config):
        raise ConfigError(
            'input.image_size',
            config.input.image_size,
            f"a size whose core grid (image_size / 2^{len(levels)}) is the source run's "
            f'{core_grid(source_config)}x{core_grid(source_config)}',
        )


def carried_params(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The EMA params of config.grow.from_workdir's run that the grown model takes over, by top-level name."""
    source_config, state = checkpoint.load_trained(config.grow.from_workdir, parts=('ema_params',))
    check_growable(config, source_config)
    if continues(config, source_config):
        return dict(state['ema_params'])
    names = carried_modules(source_config) + (('text',) if 'text' in state['ema_params'] else ())
    return {name: state['ema_params'][name] for name in names}


def frozen_modules(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The top-level modules a phase-1 run of `config` keeps fixed (with the text encoder); () otherwise."""
    if not (config.grow.from_workdir and config.grow.phase == 1):
        return ()
    return carried_modules(checkpoint.saved_config(config.grow.from_workdir))


def _is_frozen(path, frozen: tuple[str, ...]) -> bool:
    return path[0].key == 'text' or path[0].key in frozen


def stop_frozen_gradients(params: Any, frozen: tuple[str, ...]) -> Any:
    """`params` with the frozen leaves behind `lax.stop_gradient`: their weight gradients are zeros known
    at trace time, so XLA removes the matmuls and convolutions that would compute them."""
    if not frozen:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, p: jax.lax.stop_gradient(p) if _is_frozen(path, frozen) else p, params
    )


def frozen_labels(params: Any, frozen_modules: tuple[str, ...]) -> Any:
    """'frozen' for the leaves of the text encoder and of the modules in `frozen_modules`, else 'trained'."""

    def label(path, _):
        return 'frozen' if _is_frozen(path, frozen_modules) else 'trained'

    return jax.tree_util.tree_map_with_path(label, params)


def freeze(tx: optax.GradientTransformation, frozen_modules: tuple[str, ...]) -> optax.GradientTransformation:
    """`tx` for the trained params; zero updates (and no optimizer state) for the frozen ones."""
    return optax.multi_transform(
        {'trained': tx, 'frozen': optax.set_to_zero()}, lambda params: frozen_labels(params, frozen_modules)
    )
