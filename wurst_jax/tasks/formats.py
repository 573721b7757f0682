"""Which network of a family's run has a diffusers format, and under which names (export, LoRA files)."""

from wurst_jax.models.stage_c import WuerstchenPrior


def diffusers_network(task) -> tuple[str, object, str, str]:
    """(network name, module, converter component, folder name) of a family's trained network; the
    folder name is also the pipeline's name for it, the prefix of its LoRA keys."""
    family = task.config.model_family
    if family == 'stage_c':
        component = 'prior' if isinstance(task.prior, WuerstchenPrior) else 'pixart'
        return 'prior', task.prior, component, 'prior' if component == 'prior' else 'transformer'
    if family == 'stage_b':
        return 'decoder', task.decoder, 'decoder', 'decoder'
    if family == 'stage_a':
        return 'vqgan', task.vqgan, 'vqgan', 'vqgan'
    raise ValueError(f"a {family} run has no diffusers format: keep it in this project's checkpoints")
