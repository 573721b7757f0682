"""Stage B training: the decoder diffuses Stage A latents conditioned on the effnet map and text.

Latents are Würstchen's h / scale_factor of a frozen Stage A (from a Stage A run, or a converted
VQGAN). The semantic compressor is trained jointly with the decoder (the v1 recipe; what the
built-in dataset uses, as no ImageNet weights ship offline) or loaded frozen. Its input follows
Stable Cascade's recipe: the image resized by a factor drawn per batch from
`effnet.resize_jitter`, and the map zeroed for a fraction `effnet.dropout` of samples (that zero
map is the unconditional input of guidance). The jittered map is resized back to the unjittered
map size, so every branch feeds the decoder the same shape.
"""

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from wurst_jax import optim
from wurst_jax.config_lib import ConfigError
from wurst_jax.diffusion import loss as diffusion_loss
from wurst_jax.diffusion import samplers, schedule
from wurst_jax.models.layers import DTYPES
from wurst_jax.models.stage_b import WuerstchenDiffNeXt
from wurst_jax.tasks import conditioning


class StageBTask:
    """The Würstchen v2 decoder (+ a jointly trained effnet) on Stage A latents."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        dtype = DTYPES[config.dtype]
        self.text = conditioning.TextConditioner(config.text, dtype)
        self.tokenizer = self.text.tokenizer
        self.vqgan, self._vqgan_variables = conditioning.load_stage_a(config.stage_a.source)
        self.effnet = conditioning.SemanticCompressor(config.effnet, dtype)
        m = config.model
        self.decoder = WuerstchenDiffNeXt(
            c_in=self.vqgan.latent_channels,
            c_out=self.vqgan.latent_channels,
            c_r=m.c_r,
            patch_size=m.patch_size,
            c_cond=m.c_cond,
            c_hidden=tuple(m.c_hidden),
            nhead=tuple(m.nhead),
            blocks=tuple(m.blocks),
            level_config=tuple(m.level_config),
            inject_effnet=tuple(m.inject_effnet),
            effnet_embd=self.effnet.channels,
            clip_embd=self.text.width,
            kernel_size=m.kernel_size,
            dropout=m.dropout,
            remat_policy=m.remat_policy,
            dtype=dtype,
        )
        self._eval_losses = jax.jit(self._held_out_losses)

    @staticmethod
    def validate(config: ml_collections.ConfigDict) -> None:
        e = config.effnet
        conditioning.validate_stage_b(config, ('c_hidden', 'nhead', 'blocks', 'level_config', 'inject_effnet'))
        if not 0 <= e.dropout < 1:
            raise ConfigError('effnet.dropout', e.dropout, 'a probability in [0, 1)')
        if not e.resize_jitter or any(not 0 < f <= 1 for f in e.resize_jitter):
            raise ConfigError('effnet.resize_jitter', e.resize_jitter, 'a non-empty list of factors in (0, 1]')
        conditioning.validate_diffusion(config)

    # -- state -----------------------------------------------------------------------------------

    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        return conditioning.captioned_batch_spec(self.config)

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        dec_rng, eff_rng, text_rng = jax.random.split(rng, 3)
        images = batch['image']
        latents = jax.eval_shape(self.latents, {'stage_a': self._vqgan_variables}, images)
        params, state = self.effnet.init(eff_rng)
        effnet_shape = self.effnet.map_shape(self.effnet.variables(params, state, self.effnet.frozen_params()))
        params['decoder'] = self.decoder.init(
            dec_rng,
            jnp.zeros((1, *latents.shape[1:])),
            jnp.zeros((1,)),
            jnp.zeros((1, *effnet_shape)),
            jnp.zeros((1, self.config.text.max_length, self.text.width)),
        )['params']
        if self.text.trainable:
            params['text'] = self.text.init(text_rng)
        if self.config.diffusion.loss_weight == 'adaptive':
            state['loss_buckets'] = schedule.adaptive_init()
        return params, state

    def pretrained_params(self) -> dict[str, Any]:
        """Stage B always starts from scratch here (only the prior is fine-tuned from released weights,
        `configs/wuerstchen_v2_prior_finetune.py`)."""
        return {}

    def frozen_params(self) -> dict[str, Any]:
        return {'stage_a': self._vqgan_variables, **self.effnet.frozen_params(), **self.text.frozen_params()}

    def optimizer(self) -> optax.GradientTransformation:
        return optim.adamw(self.config.optimizer, self.config.total_steps)

    # -- pieces ----------------------------------------------------------------------------------

    def latents(self, frozen: dict, images: jax.Array) -> jax.Array:
        return conditioning.stage_a_latents(self.vqgan, frozen['stage_a'], images)

    def decode_latents(self, frozen: dict, latents: jax.Array) -> jax.Array:
        return conditioning.stage_a_decode(self.vqgan, frozen['stage_a'], latents)

    # -- training --------------------------------------------------------------------------------

    def grads(
        self,
        params: Any,
        model_state: Any,
        frozen: dict[str, Any],
        batch: dict[str, jax.Array],
        rng: jax.Array,
        step: jax.Array,
    ) -> tuple[Any, Any, dict[str, jax.Array]]:
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

    def denoiser(self, params: Any, frozen: dict, effnet: jax.Array, tokens: jax.Array, mask: jax.Array):
        """`denoise(x, t, conditional)` for sample_guided; unconditional = zero map and empty caption."""
        cond, uncond = self.text.encode_for_guidance(params, frozen, tokens, mask)

        def denoise(x, t, conditional):
            if conditional:
                return self.epsilon(params, x, t, effnet, cond)
            return self.epsilon(
                params, x, t, jnp.concatenate([effnet, jnp.zeros_like(effnet)]), jnp.concatenate([cond, uncond])
            )

        return denoise

    def sample(
        self,
        params: Any,
        frozen: dict,
        effnet: jax.Array,
        tokens: jax.Array,
        mask: jax.Array,
        rng: jax.Array,
        *,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> jax.Array:
        """Images in [-1, 1] from effnet maps [B, h, w, c] (raw space) and captions."""
        latents = self.sample_latents(params, frozen, effnet, tokens, mask, rng, steps=steps, guidance=guidance)
        return jnp.clip(self.decode_latents(frozen, latents), -1, 1)

    def sample_latents(
        self,
        params: Any,
        frozen: dict,
        effnet: jax.Array,
        tokens: jax.Array,
        mask: jax.Array,
        rng: jax.Array,
        *,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> jax.Array:
        """`sample` before Stage A decodes: the sampled Stage A latents [B, H/f, W/f, c]."""
        s = self.config.sample
        size = self.config.input.image_size
        f = size // jax.eval_shape(self.latents, frozen, jnp.zeros((1, size, size, 3))).shape[1]
        init_rng, rng = jax.random.split(rng)
        x = jax.random.normal(init_rng, (tokens.shape[0], size // f, size // f, self.vqgan.latent_channels))
        return samplers.sample_guided(
            self.denoiser(params, frozen, effnet, tokens, mask),
            x,
            rng,
            samplers.linspace_timesteps(steps or s.decoder_steps),
            s.decoder_guidance if guidance is None else guidance,
            self.config.diffusion.sampler,
        )

    def visualize(self, params: Any, model_state: Any, frozen: dict, batch: dict[str, jax.Array]) -> jax.Array:
        """Each image beside Stage B's sample from its effnet map and caption, decoded by Stage A."""
        return conditioning.visualize_decoder(self, params, model_state, frozen, batch)

    def _held_out_losses(self, params: Any, model_state: Any, frozen: dict, batch: dict) -> jax.Array:
        x0 = self.latents(frozen, batch['image'])
        effnet, _ = self.effnet.map(self.effnet.variables(params, model_state, frozen), batch['image'])
        cond = self.text.encode(self.text.params(params, frozen), batch['tokens'], batch['token_mask'])
        return diffusion_loss.fixed_time_losses(lambda x, t: self.epsilon(params, x, t, effnet, cond), x0)

    def evaluate(
        self, params: Any, model_state: Any, frozen: dict, batches: Iterable[dict[str, np.ndarray]]
    ) -> dict[str, float]:
        """Unweighted ε-MSE on held-out images at fixed noise levels and noise."""
        return conditioning.evaluate_held_out(
            self._eval_losses, params, model_state, frozen, batches, self.batch_spec()
        )
