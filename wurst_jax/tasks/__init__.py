"""Model families the training loop can train, chosen by `config.model_family`.

A task is the family-specific part of training: it builds its networks, initialises params, turns a
batch into gradients, and renders and evaluates samples. Everything else (mesh, optimizer state,
EMA, checkpoints, logging) is shared in wurst_jax.train.
"""
from typing import Any

import ml_collections

from wurst_jax.config_lib import ConfigError
from wurst_jax.tasks import pixel, stage_a, stage_b, stage_c

FAMILIES = {'stage_a': stage_a.StageATask, 'stage_b': stage_b.StageBTask, 'stage_c': stage_c.StageCTask,
            'pixel': pixel.PixelTask}


def _family(config: ml_collections.ConfigDict):
    if config.model_family not in FAMILIES:
        raise ConfigError('model_family', config.model_family, f'one of {sorted(FAMILIES)}')
    return FAMILIES[config.model_family]


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the fields of config.model_family's own config section."""
    _family(config).validate(config)


def create(config: ml_collections.ConfigDict) -> Any:
    """The task object for config.model_family."""
    return _family(config)(config)
