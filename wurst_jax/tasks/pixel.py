"""Pixel-space text-to-image diffusion with greedy growing (`model_family='pixel'`).

The denoiser works on the image itself: a Shallow-UViT (`model.level_channels=()`, entry stride
`model.patch_size`) to train the core, or a UNet with those levels around the core
(`models/shallow_uvit.py`), trained from scratch or grown from a core run (`grow.from_workdir`,
`wurst_jax/growing.py`). The text encoder is trained with the model, as in Stage C's shapes runs.

Diffusion: v-prediction with Simple Diffusion's resolution-shifted cosine schedule
(`schedule.shifted_cosine_logsnr`, base `diffusion.schedule_base`), t uniform, unweighted MSE;
sampling with DDIM (or the configured sampler) on the same schedule, with classifier-free guidance.
The network's time input is the equivalent time of the repository's cosine schedule
(`schedule.shifted_cosine_time`), a fixed function of the noise level, so a core trained at one
resolution sees the same embedding for the same logSNR after growing.

Evaluation: the held-out loss at fixed noise levels, and the shapes alignment (colour, position,
shape, all correct) of images sampled from `eval.alignment_prompts` fresh captions.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from wurst_jax import checkpoint, growing, sharding
from wurst_jax.config_lib import ConfigError, validate_optimizer
from wurst_jax.data import shapes
from wurst_jax.diffusion import loss as diffusion_loss
from wurst_jax.diffusion import samplers, schedule
from wurst_jax.evaluate import shapes_alignment
from wurst_jax.models.shallow_uvit import GrownUNet, ShallowUViT
from wurst_jax.tasks import conditioning
from wurst_jax.tasks.base import Batch, HostBatches, Metrics, Networks
from wurst_jax.visualize import to_uint8

PHASES = (1, 2)  # 1: only the new layers train; 2: everything trains


class PixelTask(conditioning.CaptionedTask):
    """A pixel-space denoiser and its text encoder, trained on captioned images."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m = config.model
        core = dict(c=m.c, depth=m.depth, num_heads=m.num_heads, c_r=m.c_r, dtype=self.dtype)
        if m.level_channels:
            self.denoiser = GrownUNet(level_channels=tuple(m.level_channels), **core)
        else:
            self.denoiser = ShallowUViT(patch_size=m.patch_size, **core)
        size = config.input.image_size
        # Static sampling times, computed once here, outside any jit.
        self._timesteps = np.asarray(
            schedule.shifted_cosine_time(
                samplers.linspace_timesteps(config.sample.steps), size, config.diffusion.schedule_base
            )
        )
        self._eval_losses = jax.jit(self._held_out_losses)
        self._sample_images = jax.jit(self.sample)
        self._frozen_modules = growing.frozen_modules(config)  # phase 1 of a grown run; else ()

    @staticmethod
    def validate(config: ml_collections.ConfigDict) -> None:
        m = config.model
        for field in ('c', 'depth', 'num_heads', 'c_r', 'patch_size'):
            if not (isinstance(m[field], int) and m[field] > 0):
                raise ConfigError(f'model.{field}', m[field], 'a positive integer')
        if m.c % m.num_heads or m.c % 4:
            raise ConfigError(
                'model.c', m.c, f'a multiple of model.num_heads={m.num_heads} and of 4 (sin-cos positions)'
            )
        if not all(isinstance(w, int) and w > 0 for w in m.level_channels):
            raise ConfigError('model.level_channels', m.level_channels, 'positive widths, from the core outward')
        size, levels = config.input.image_size, len(m.level_channels)
        stride = 2**levels if levels else m.patch_size
        if size % stride:
            raise ConfigError('input.image_size', size, f'a multiple of {stride} (2^levels, or the patch size)')
        conditioning.validate_text(config.text)
        validate_optimizer(config, 'optimizer')
        d = config.diffusion
        if d.sampler not in samplers.SAMPLERS:
            raise ConfigError('diffusion.sampler', d.sampler, f'one of {samplers.SAMPLERS}')
        if not d.schedule_base > 0:
            raise ConfigError('diffusion.schedule_base', d.schedule_base, 'a positive image side')
        if config.grow.phase not in PHASES:
            raise ConfigError('grow.phase', config.grow.phase, f'one of {PHASES}')
        if config.grow.from_workdir:
            source_config = checkpoint.saved_config(config.grow.from_workdir)
            if source_config is None:
                raise ConfigError(
                    'grow.from_workdir', config.grow.from_workdir, 'a trained pixel run (it has no checkpoint)'
                )
            growing.check_growable(config, source_config)

    # -- state -----------------------------------------------------------------------------------

    def init(self, rng: jax.Array, batch: dict[str, jax.Array] | None = None) -> tuple[Any, Any]:
        del batch  # shapes come from the config
        denoiser_rng, text_rng = jax.random.split(rng)
        size = self.config.input.image_size
        text = jnp.zeros((1, self.config.text.max_length, self.text.width))
        # The denoiser's modules (core, levels, entry, exit) are top-level names beside 'text', so
        # growing hands the carried ones to train_state.with_pretrained whole, the new ones keep this init.
        params = dict(self.denoiser.init(denoiser_rng, jnp.zeros((1, size, size, 3)), jnp.zeros((1,)), text)['params'])
        if self.text.trainable:
            params['text'] = self.text.init(text_rng)
        return params, {}

    def pretrained_params(self) -> dict[str, Any]:
        """With grow.from_workdir: the modules (and text encoder) carried over from that run."""
        return growing.carried_params(self.config) if self.config.grow.from_workdir else {}

    def frozen_params(self) -> dict[str, Any]:
        return self.text.frozen_params()

    def optimizer(self) -> optax.GradientTransformation:
        tx = super().optimizer()
        return growing.freeze(tx, self._frozen_modules) if self._frozen_modules else tx

    # -- training --------------------------------------------------------------------------------

    def noise_time(self, t: jax.Array) -> jax.Array:
        """The shifted schedule's t [B] -> the cosine-schedule time add_noise and the network take."""
        return schedule.shifted_cosine_time(t, self.config.input.image_size, self.config.diffusion.schedule_base)

    def denoiser_output(self, params: Any, x: jax.Array, t: jax.Array, text: jax.Array) -> jax.Array:
        """The raw prediction (v) for images x [B, H, W, 3] at cosine-schedule times t [B]."""
        return self.denoiser.apply({'params': {k: v for k, v in params.items() if k != 'text'}}, x, t, text)

    def grads(
        self, params: Networks, model_state: Networks, frozen: Networks, batch: Batch, rng: jax.Array, step: jax.Array
    ) -> tuple[Networks, Networks, Metrics]:
        del step
        t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
        x0 = batch['image'].astype(jnp.float32)
        t = self.noise_time(schedule.sample_t(t_rng, x0.shape[0], 'uniform'))
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        x_t = schedule.add_noise(x0, noise, t)
        v = schedule.v_target(x0, noise, t)
        tokens, mask = self.text.drop(drop_rng, batch['tokens'], batch['token_mask'])

        def loss_fn(p):
            p = growing.stop_frozen_gradients(p, self._frozen_modules)
            text = self.text.encode(self.text.params(p, frozen), tokens, mask)
            return diffusion_loss.epsilon_loss(self.denoiser_output(p, x_t, t, text), v, t, 'none')

        (loss, raw), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, model_state, dict(loss=loss, mse=jnp.mean(raw))

    # -- sampling and evaluation -----------------------------------------------------------------

    def sample(self, params: Any, frozen: dict, tokens: jax.Array, mask: jax.Array, rng: jax.Array) -> jax.Array:
        """Images [B, H, W, 3] in about [-1, 1] for the tokenized captions, with guidance sample.guidance."""
        cond, uncond = self.text.encode_for_guidance(params, frozen, tokens, mask)

        def denoise(x, t, conditional):
            text = cond if conditional else jnp.concatenate([cond, uncond])
            return diffusion_loss.to_epsilon('v', self.denoiser_output(params, x, t, text), x, t)

        size = self.config.input.image_size
        init_rng, rng = jax.random.split(rng)
        x = jax.random.normal(init_rng, (tokens.shape[0], size, size, 3), jnp.float32)
        return samplers.sample_guided(
            denoise, x, rng, self._timesteps, self.config.sample.guidance, self.config.diffusion.sampler
        )

    def visualize(self, params: Any, model_state: Any, frozen: dict, batch: dict[str, jax.Array]) -> jax.Array:
        """Each image beside the one sampled from its caption."""
        del model_state
        fake = self.sample(params, frozen, batch['tokens'], batch['token_mask'], jax.random.key(0))
        return jnp.clip(jnp.concatenate([batch['image'], fake], axis=2), -1, 1)

    def _held_out_losses(self, params: Any, model_state: Any, frozen: dict, batch: dict) -> jax.Array:
        del model_state
        text = self.text.encode(self.text.params(params, frozen), batch['tokens'], batch['token_mask'])
        return diffusion_loss.fixed_time_losses(
            lambda x, t: diffusion_loss.to_epsilon('v', self.denoiser_output(params, x, t, text), x, t), batch['image']
        )

    def alignment(
        self, params: Any, frozen: dict, captions: list[str], batch_size: int, seed: int = 1
    ) -> dict[str, float]:
        """Shapes alignment of images sampled from `captions`, `batch_size` at a time."""
        images = []
        for start in range(0, len(captions), batch_size):
            encoded = self.tokenizer(captions[start : start + batch_size])
            rng = jax.random.fold_in(jax.random.key(seed), start)
            images.append(
                to_uint8(
                    sharding.to_host(
                        self._sample_images(params, frozen, encoded['input_ids'], encoded['attention_mask'], rng)
                    )
                )
            )
        return shapes_alignment.evaluate(np.concatenate(images), captions)

    def evaluate(
        self, params: Networks, model_state: Networks, frozen: Networks, batches: HostBatches
    ) -> dict[str, float]:
        """Unweighted ε-MSE on held-out images at fixed noise levels, and the alignment of fresh captions."""
        result = conditioning.evaluate_held_out(
            self._eval_losses, params, model_state, frozen, batches, self.batch_spec()
        )
        ev = self.config.eval
        if ev.alignment_prompts:
            scores = self.alignment(params, frozen, shapes.fresh_captions(ev.alignment_prompts), ev.batch_size)
            result.update({f'alignment_{k}': float(v) for k, v in scores.items()})
        return result
