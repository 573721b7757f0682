"""Stage B training: the decoder diffuses Stage A latents conditioned on the effnet map and text.

Latents are Würstchen's h / scale_factor of a frozen Stage A (from a Stage A run, or a converted
VQGAN). The semantic compressor is trained jointly with the decoder (the v1 recipe; what the
built-in dataset uses, as no ImageNet weights ship offline) or loaded frozen. Its input follows
Stable Cascade's recipe: the image resized by a factor drawn per batch from
`effnet.resize_jitter`, and the map zeroed for a fraction `effnet.dropout` of samples (that zero
map is the unconditional input of guidance). The jittered map is resized back to the unjittered
map size, so every branch feeds the decoder the same shape.
"""

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from wurst_jax import convert
from wurst_jax.config_lib import ConfigError
from wurst_jax.diffusion import loss as diffusion_loss
from wurst_jax.diffusion import samplers, schedule
from wurst_jax.models.stage_b import WuerstchenDiffNeXt
from wurst_jax.tasks import conditioning
from wurst_jax.tasks.base import Batch, HostBatches, Metrics, Networks


class StageBTask(conditioning.DecoderTask):
    """The Würstchen v2 decoder (+ a jointly trained effnet) on Stage A latents."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.decoder, self._pretrained = self._build_decoder(config.init.decoder)
        self._eval_losses = jax.jit(self._held_out_losses)

    def _build_decoder(self, source: str) -> tuple[WuerstchenDiffNeXt, dict[str, Any]]:
        """(decoder, pretrained params): fresh from config.model, or, fine-tuning, a converted decoder's
        architecture and weights (e.g. the released v2 Stage B, diffusers' WuerstchenDiffNeXt folder)."""
        c, m = self.vqgan.latent_channels, self.config.model
        if not source:
            decoder = WuerstchenDiffNeXt(
                c_in=c, c_out=c, inject_effnet=tuple(m.inject_effnet), clip_embd=self.text.width, **self.unet_fields()
            )
            return decoder, {}
        decoder, variables = convert.load_diffusers(
            source, 'decoder', dropout=m.dropout, remat_policy=m.remat_policy, dtype=self.dtype
        )
        want = dict(c_in=c, c_out=c, clip_embd=self.text.width, effnet_embd=self.effnet.channels)
        have = {k: getattr(decoder, k) for k in want}
        if have != want:
            raise ConfigError(
                'init.decoder', source, f'a decoder for this Stage A, text encoder and effnet, {want}; it has {have}'
            )
        return decoder, {'decoder': variables['params']}

    def pretrained_params(self) -> dict[str, Any]:
        """The decoder config.init.decoder starts from ({} from scratch)."""
        return self._pretrained

    @staticmethod
    def validate(config: ml_collections.ConfigDict) -> None:
        e = config.effnet
        conditioning.validate_stage_b(config, ('c_hidden', 'nhead', 'blocks', 'level_config', 'inject_effnet'))
        if not 0 <= e.dropout < 1:
            raise ConfigError('effnet.dropout', e.dropout, 'a probability in [0, 1)')
        if not e.resize_jitter or any(not 0 < f <= 1 for f in e.resize_jitter):
            raise ConfigError('effnet.resize_jitter', e.resize_jitter, 'a non-empty list of factors in (0, 1]')
        if config.init.decoder and not os.path.exists(config.init.decoder):
            raise ConfigError('init.decoder', config.init.decoder, "a converted decoder's folder, or '' to start fresh")
        conditioning.validate_diffusion(config)

    # -- state -----------------------------------------------------------------------------------

    def decoder_input(self, image_hw: tuple[int, int] | None = None) -> jax.Array:
        size = self.config.input.image_size
        images = jax.ShapeDtypeStruct((1, *(image_hw or (size, size)), 3), jnp.float32)
        return jnp.zeros(jax.eval_shape(self.latents, self.frozen_params(), images).shape)

    def init(self, rng: jax.Array, batch: Batch) -> tuple[Networks, Networks]:
        params, state = super().init(rng, batch)
        if self.config.diffusion.loss_weight == 'adaptive':
            state['loss_buckets'] = schedule.adaptive_init()
        return params, state

    # -- pieces ----------------------------------------------------------------------------------

    def latents(self, frozen: dict, images: jax.Array) -> jax.Array:
        return conditioning.stage_a_latents(self.vqgan, frozen['stage_a'], images)

    def decode_latents(self, frozen: dict, latents: jax.Array) -> jax.Array:
        return conditioning.stage_a_decode(self.vqgan, frozen['stage_a'], latents)

    # -- training --------------------------------------------------------------------------------

    def grads(
        self, params: Networks, model_state: Networks, frozen: Networks, batch: Batch, rng: jax.Array, step: jax.Array
    ) -> tuple[Networks, Networks, Metrics]:
        del step
        d, e = self.config.diffusion, self.config.effnet
        t_rng, noise_rng, drop_rng, dropout_rng, jitter_rng, zero_rng, sd_rng = jax.random.split(rng, 7)
        images = batch['image']
        x0 = jax.lax.stop_gradient(self.latents(frozen, images))
        t = schedule.sample_t(t_rng, x0.shape[0], d.t_sampling)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        x_t = schedule.add_noise(x0, noise, t)
        tokens, mask = self.text.drop(drop_rng, batch['tokens'], batch['token_mask'])
        keep = (jax.random.uniform(zero_rng, (x0.shape[0], 1, 1, 1)) >= e.dropout).astype(jnp.float32)
        choice = jax.random.randint(jitter_rng, (), 0, len(e.resize_jitter))
        target = diffusion_loss.target(d.prediction, x0, noise, t)

        def loss_fn(p):
            variables = self.effnet.variables(p, model_state, frozen)
            branches = [lambda v, f=f: self.effnet.map(v, images, f, train=True, rng=sd_rng) for f in e.resize_jitter]
            effnet, bn_updates = (
                branches[0](variables) if len(branches) == 1 else jax.lax.switch(choice, branches, variables)
            )
            cond = self.text.encode(self.text.params(p, frozen), tokens, mask)
            out = self.decoder.apply(
                {'params': p['decoder']},
                x_t,
                t,
                effnet * keep,
                cond,
                deterministic=False,
                rngs={'dropout': dropout_rng},
            )
            loss, raw = diffusion_loss.epsilon_loss(
                out, target, t, d.loss_weight, model_state.get('loss_buckets'), d.p2_k
            )
            return loss, (raw, bn_updates)

        (loss, (raw, bn_updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new_state = dict(model_state)
        if bn_updates is not None:
            new_state['effnet'] = bn_updates
        if d.loss_weight == 'adaptive':
            new_state['loss_buckets'] = schedule.adaptive_update(model_state['loss_buckets'], t, raw)
        return grads, new_state, dict(loss=loss, mse=jnp.mean(raw))

    # -- sampling and evaluation -----------------------------------------------------------------

    def epsilon(self, params: Any, x: jax.Array, t: jax.Array, effnet: jax.Array, cond: jax.Array) -> jax.Array:
        """The decoder's noise estimate ε̂ (converted from v̂ when diffusion.prediction='v')."""
        out = self.decoder.apply({'params': params['decoder']}, x, t, effnet, cond)
        return diffusion_loss.to_epsilon(self.config.diffusion.prediction, out, x, t)

    def prediction(self, params: Any, x: jax.Array, t: jax.Array, effnet: jax.Array, cond: jax.Array) -> jax.Array:
        """What sampling steps by: the noise estimate ε̂."""
        return self.epsilon(params, x, t, effnet, cond)

    def decoder_map(self, effnet: jax.Array) -> jax.Array:
        """The map as the decoder reads it: the effnet's raw space."""
        return effnet

    def sample_loop(self, predict, rng: jax.Array, shape: tuple[int, ...], steps: int, guidance: float) -> jax.Array:
        """Stage A latents `shape` [B, H/f, W/f, c] by the configured sampler over `steps` evenly spaced
        times; `predict(x, t, conditional)` is the guided ε̂."""
        init_rng, rng = jax.random.split(rng)
        x = jax.random.normal(init_rng, shape)
        timesteps = samplers.linspace_timesteps(steps)
        return samplers.sample_guided(predict, x, rng, timesteps, guidance, self.config.diffusion.sampler)

    def _held_out_losses(self, params: Any, model_state: Any, frozen: dict, batch: dict) -> jax.Array:
        x0 = self.latents(frozen, batch['image'])
        effnet, _ = self.effnet.map(self.effnet.variables(params, model_state, frozen), batch['image'])
        cond = self.text.encode(self.text.params(params, frozen), batch['tokens'], batch['token_mask'])
        return diffusion_loss.fixed_time_losses(lambda x, t: self.epsilon(params, x, t, effnet, cond), x0)

    def evaluate(
        self, params: Networks, model_state: Networks, frozen: Networks, batches: HostBatches
    ) -> dict[str, float]:
        """Unweighted ε-MSE on held-out images at fixed noise levels and noise."""
        return conditioning.evaluate_held_out(
            self._eval_losses, params, model_state, frozen, batches, self.batch_spec()
        )
