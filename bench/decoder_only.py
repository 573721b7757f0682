"""Stage B's decoder trained alone, for the side-by-side step benchmark: the task contract over our
Stage B task's `WuerstchenDiffNeXt`, fed the Stage A latents, effnet maps and text states the batch
gives, as diffusers' `WuerstchenDiffNeXt` is in `reference_steps.decoder_step`. The step `main` runs
also encodes the images with the frozen VQGAN and trains the effnet and the text encoder with the
decoder; this one times the network both sides share, like for like."""

from typing import Any

import jax
import jax.numpy as jnp

from wurst_jax.diffusion import loss as diffusion_loss
from wurst_jax.diffusion import schedule


class DecoderOnlyTask:
    """The Stage B `task`'s decoder, its loss and optimizer; no frozen networks, nothing else trained."""

    def __init__(self, task):
        self.task, self.config, self.tokenizer = task, task.config, None
        size = self.config.input.image_size
        images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        self.latent_shape = jax.eval_shape(task.latents, task.frozen_params(), images).shape[1:]
        params, state = jax.eval_shape(task.effnet.init, jax.random.key(0))
        self.effnet_shape = task.effnet.map_shape(task.effnet.variables(params, state, task.effnet.frozen_params()))
        self.text_shape = (self.config.text.max_length, task.text.width)

    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        return {
            'latents': (self.latent_shape, jnp.float32),
            'effnet': (self.effnet_shape, jnp.float32),
            'text_states': (self.text_shape, jnp.float32),
        }

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[dict, dict]:
        del batch
        shapes = (self.latent_shape, (), self.effnet_shape, self.text_shape)
        params = self.task.decoder.init(rng, *(jnp.zeros((1, *s)) for s in shapes))['params']
        return {'decoder': params}, {}

    def pretrained_params(self) -> dict:
        return {}

    def frozen_params(self) -> dict:
        return {}

    def optimizer(self):
        return self.task.optimizer()

    def grads(self, params, model_state, frozen, batch, rng, step):
        del frozen, step
        d = self.config.diffusion
        t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
        x0 = batch['latents']
        t = schedule.sample_t(t_rng, x0.shape[0], d.t_sampling)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        x_t = schedule.add_noise(x0, noise, t)
        target = diffusion_loss.target(d.prediction, x0, noise, t)

        def loss_fn(p):
            out = self.task.decoder.apply(
                {'params': p['decoder']},
                x_t,
                t,
                batch['effnet'],
                batch['text_states'],
                deterministic=False,
                rngs={'dropout': dropout_rng},
            )
            return diffusion_loss.epsilon_loss(out, target, t, d.loss_weight, None, d.p2_k)

        (loss, raw), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, model_state, dict(loss=loss, mse=jnp.mean(raw))
