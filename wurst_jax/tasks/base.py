"""The contract between a model family and the code that drives it.

`Task` is what the training loop (`wurst_jax.train`), its step (`wurst_jax.train_state`) and the
lowering (`wurst_jax.lowering`) use; `PriorSampler` and `DecoderSampler` are what sampling
(`wurst_jax.pipeline`, and through it the evaluation job) uses of a trained Stage C and Stage B.
A family is a class in `wurst_jax/tasks/` built from the whole config, one line in
`tasks.FAMILIES`, its default config in `wurst_jax/defaults.py`, and a config file. Shapes below:
B batch, H x W images, L caption tokens; a batch is a dict of arrays named by `batch_spec`, images
float32 in [-1, 1]. `params`, `model_state` and `frozen` are dicts of pytrees keyed by network name
(e.g. 'prior', 'text', 'effnet').
"""

from typing import Any, Iterable, Protocol

import jax
import ml_collections
import numpy as np
import optax

Batch = dict[str, jax.Array]
BatchSpec = dict[str, tuple[tuple[int, ...], Any]]  # name -> (per-example shape, dtype)
Networks = dict[str, Any]  # network name -> its params (or variables, or state)
Metrics = dict[str, jax.Array]
HostBatches = Iterable[dict[str, np.ndarray]]  # held-out batches, numpy on the host


class Task(Protocol):
    config: ml_collections.ConfigDict
    tokenizer: Any  # captions -> {'input_ids', 'attention_mask'} int32 [B, L]; None for image-only families

    @staticmethod
    def validate(config: ml_collections.ConfigDict) -> None:
        """Raises config_lib.ConfigError for the first bad field of the family's sections."""

    def batch_spec(self) -> BatchSpec:
        """Name -> (per-example shape, dtype) of a training batch, e.g. 'image': ((H, W, 3), float32)."""

    def init(self, rng: jax.Array, batch: Batch) -> tuple[Networks, Networks]:
        """(params with logical-axis boxes, model_state) from an example batch of one."""

    def pretrained_params(self) -> Networks:
        """Network name -> params a fresh run starts from (fine-tuning, the next stage of a plan); {} if none."""

    def frozen_params(self) -> Networks:
        """Networks the step uses but does not train (loaded once, never checkpointed)."""

    def optimizer(self) -> optax.GradientTransformation:
        """The optimizer over `params` (a frozen part routed to zero updates, if any)."""

    def grads(
        self, params: Networks, model_state: Networks, frozen: Networks, batch: Batch, rng: jax.Array, step: jax.Array
    ) -> tuple[Networks, Networks, Metrics]:
        """(gradients shaped like params, the new model_state, scalar metrics including 'loss')."""

    def visualize(self, params: Networks, model_state: Networks, frozen: Networks, batch: Batch) -> jax.Array:
        """Images [N, H', W', 3] in [-1, 1] of the batch's first N examples for the run's image grid."""

    def evaluate(
        self, params: Networks, model_state: Networks, frozen: Networks, batches: HostBatches
    ) -> dict[str, float]:
        """Scalar metrics over held-out batches, deterministic for given params."""


class PriorSampler(Protocol):
    """A trained Stage C, for sampling."""

    config: ml_collections.ConfigDict
    tokenizer: Any
    space: str  # 'effnet' (the semantic map Stage B decodes) or 'stage_a' (single-stage: Stage A latents)

    def frozen_params(self) -> Networks:
        """As Task.frozen_params."""

    def sample(
        self, params: Any, frozen: dict, tokens: jax.Array, mask: jax.Array, rng: jax.Array, **kwargs
    ) -> jax.Array:
        """Latents [B, h, w, c] for captions tokens/mask int32 [B, L], in the space Stage B (or Stage A) reads.
        Keyword arguments: steps and guidance (the config's `sample` section where absent or None)."""

    def decode(self, frozen: Networks, latents: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] in [-1, 1] from sampled Stage A latents (space 'stage_a' only)."""


class DecoderSampler(Protocol):
    """A trained Stage B, for sampling."""

    config: ml_collections.ConfigDict
    tokenizer: Any

    def frozen_params(self) -> Networks:
        """As Task.frozen_params."""

    def sample(
        self, params: Any, frozen: dict, effnet: jax.Array, tokens: jax.Array, mask: jax.Array, rng: jax.Array, **kwargs
    ) -> jax.Array:
        """Images [B, H, W, 3] in [-1, 1] decoded through Stage A from Stage C's map effnet [B, h, w, c]
        (the effnet's raw space). Keyword arguments as PriorSampler.sample's; a token Stage B (Würstchen v1) also
        takes `temperature=(start, end)`."""
