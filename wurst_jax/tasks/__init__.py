"""Model families the training loop can train, chosen by `config.model_family`.

A task is the family-specific part of training: it builds its networks, initialises params, turns a
batch into gradients, and renders and evaluates samples (the contract: `tasks/base.py`). Everything
else (mesh, optimizer state, EMA, checkpoints, logging) is shared in wurst_jax.train.
"""

import ml_collections

from wurst_jax import config_lib, defaults, lora
from wurst_jax.config_lib import ConfigError
from wurst_jax.tasks import conditioning, pixel, stage_a, stage_b, stage_b_tokens, stage_c
from wurst_jax.tasks.base import Task
from wurst_jax.tasks.lora_task import LoraTask, as_trained

FAMILIES = {
    'stage_a': stage_a.StageATask,
    'stage_b': stage_b.StageBTask,
    'stage_b_tokens': stage_b_tokens.TokenStageBTask,
    'stage_c': stage_c.StageCTask,
    'pixel': pixel.PixelTask,
}


def _family(config: ml_collections.ConfigDict):
    if config.model_family not in FAMILIES:
        raise ConfigError('model_family', config.model_family, f'one of {sorted(FAMILIES)}')
    return FAMILIES[config.model_family]


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises config_lib.ConfigError for the first invalid field, the shared ones first, then the
    family's own: call before building anything. A field the family's defaults lack is refused first."""
    _family(config)
    defaults.check_known_fields(config)
    config_lib.validate(config)
    lora.validate(config)
    _family(config).validate(config)


def load_trained(source: str, family: str | tuple[str, ...], step: int | None = None) -> tuple[Task, dict, dict]:
    """(task, EMA params, model_state) of a trained run of `family` in workdir `source` at `step`
    (the newest checkpoint by default): what sampling and evaluation use."""
    config, params, model_state = conditioning.trained_run(source, family, step)
    task = create(config)
    if isinstance(task, LoraTask):  # adapters: sampled and evaluated as the base merged with them
        task, params = as_trained(task, params)
    return task, params, model_state


def create(config: ml_collections.ConfigDict) -> Task:
    """The task object for config.model_family; with config.lora.rank, its adapters on a frozen base."""
    task = _family(config)(config)
    return LoraTask(task) if config.lora.rank else task
