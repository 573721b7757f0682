"""Stage A training: VQGAN reconstruction (MSE + VQ + commitment) with an optional adversarial
loss from a spectral-norm discriminator that switches on at `loss.adv_start`, and an optional
VGG16 perceptual loss whose weights come from a local file."""

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from wurst_jax import optim, perceptual, sharding
from wurst_jax.config_lib import ConfigError, validate_optimizer
from wurst_jax.models.layers import DTYPES
from wurst_jax.models.stage_a import VQGAN, Discriminator
from wurst_jax.models.vgg import VGG16Features, perceptual_distance
from wurst_jax.tasks.base import Batch, HostBatches, Metrics, Networks


def psnr(images: jax.Array, reference: jax.Array) -> jax.Array:
    """Per-image PSNR in dB of [-1, 1] images, compared in [0, 1] after clipping: [B]."""
    a = jnp.clip((images + 1) / 2, 0, 1)
    b = jnp.clip((reference + 1) / 2, 0, 1)
    mse = jnp.mean((a - b) ** 2, axis=(1, 2, 3))
    return 10 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


class StageATask:
    """VQGAN (+ discriminator) training for Stage A."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        m = config.model
        dtype = DTYPES[config.dtype]
        self.vqgan = VQGAN(**m.to_dict(), dtype=dtype)  # config.model holds exactly the VQGAN's fields
        self.use_disc = config.loss.adv_weight > 0
        self.disc = Discriminator(c_hidden=config.disc.c_hidden, depth=config.disc.depth, dtype=dtype)
        self.use_perceptual = config.loss.perceptual_weight > 0
        self.vgg = VGG16Features()
        self._eval_images = jax.jit(self._image_metrics)  # compiled once, reused at every evaluation
        self.tokenizer = None  # Stage A reads no captions

    @staticmethod
    def validate(config: ml_collections.ConfigDict) -> None:
        m, loss = config.model, config.loss
        for field in ('levels', 'embed_dim', 'bottleneck_blocks', 'latent_channels', 'num_codes'):
            if not (isinstance(m[field], int) and m[field] > 0):
                raise ConfigError(f'model.{field}', m[field], 'a positive integer')
        if m.embed_dim % 2 ** (m.levels - 1):
            raise ConfigError('model.embed_dim', m.embed_dim, f'divisible by 2**(levels-1) = {2 ** (m.levels - 1)}')
        if config.input.image_size % 2**m.levels:
            raise ConfigError(
                'input.image_size',
                config.input.image_size,
                f'a multiple of 2**levels = {2**m.levels} (the VQGAN downsampling)',
            )
        for field in ('mse_weight', 'vq_weight', 'commit_weight', 'adv_weight', 'perceptual_weight'):
            if loss[field] < 0:
                raise ConfigError(f'loss.{field}', loss[field], 'a weight >= 0')
        if not (isinstance(loss.adv_start, int) and loss.adv_start >= 0):
            raise ConfigError('loss.adv_start', loss.adv_start, 'a step >= 0')
        if loss.perceptual_weight > 0 and not os.path.isfile(loss.perceptual_weights):
            raise ConfigError(
                'loss.perceptual_weights',
                loss.perceptual_weights,
                "a local file with torchvision's vgg16 state dict (.pth or .npz), or set loss.perceptual_weight=0",
            )
        if loss.adv_weight > 0:
            validate_optimizer(config, 'disc_optimizer')
            size = config.input.image_size
            if size % 2**config.disc.depth:
                raise ConfigError(
                    'disc.depth', config.disc.depth, f'a depth with 2**depth dividing input.image_size={size}'
                )

    # -- state -----------------------------------------------------------------------------------

    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Per-example shape and dtype of each batch entry the step reads."""
        size = self.config.input.image_size
        return {'image': ((size, size, 3), jnp.float32)}

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        """Boxed params and model state (BatchNorm / spectral-norm statistics) for an example batch."""
        images = batch['image']
        vq_rng, disc_rng = jax.random.split(rng)
        variables = self.vqgan.init(vq_rng, images, train=False)
        params = {'vqgan': variables['params']}
        state = {'vqgan': {'batch_stats': variables['batch_stats']}}
        if self.use_disc:
            disc_vars = self.disc.init(disc_rng, images, train=False)
            params['disc'] = disc_vars['params']
            state['disc'] = {'batch_stats': disc_vars['batch_stats']}
        return params, state

    def pretrained_params(self) -> dict[str, Any]:
        """Stage A always starts from scratch."""
        return {}

    def frozen_params(self) -> dict[str, Any]:
        """Networks used but not trained: the VGG16 of the perceptual loss, when it is on."""
        if not self.use_perceptual:
            return {}
        return {'vgg': perceptual.load_vgg16_params(self.config.loss.perceptual_weights)}

    def optimizer(self) -> optax.GradientTransformation:
        """AdamW for the VQGAN; a separate AdamW for the discriminator."""
        total = self.config.total_steps
        transforms = {'vqgan': optim.adamw(self.config.optimizer, total)}
        if self.use_disc:
            transforms['disc'] = optim.adamw(self.config.disc_optimizer, total)
        labels = lambda params: {k: jax.tree.map(lambda _: k, v) for k, v in params.items()}
        return optax.multi_transform(transforms, labels)

    # -- training --------------------------------------------------------------------------------

    def grads(
        self, params: Networks, model_state: Networks, frozen: Networks, batch: Batch, rng: jax.Array, step: jax.Array
    ) -> tuple[Networks, Networks, Metrics]:
        """Gradients of the VQGAN loss and (from adv_start) of the discriminator loss."""
        del rng  # Stage A training is deterministic given the batch.
        loss_cfg = self.config.loss
        x = batch['image']
        adv_on = (step >= loss_cfg.adv_start).astype(jnp.float32)

        def vqgan_loss(vq_params):
            (recon, aux), new_vars = self.vqgan.apply(
                {'params': vq_params, **model_state['vqgan']}, x, train=True, mutable=['batch_stats']
            )
            mse = jnp.mean((recon - x) ** 2)
            loss = (
                loss_cfg.mse_weight * mse
                + loss_cfg.vq_weight * aux['vq_loss']
                + loss_cfg.commit_weight * aux['commit_loss']
            )
            metrics = dict(
                mse=mse, vq_loss=aux['vq_loss'], commit_loss=aux['commit_loss'], psnr=jnp.mean(psnr(recon, x))
            )
            if self.use_perceptual:
                features = self.vgg.apply({'params': frozen['vgg']}, jnp.concatenate([recon, x]))
                halves = [jnp.split(f, 2) for f in features]
                distance = jnp.mean(perceptual_distance([a for a, _ in halves], [b for _, b in halves]))
                loss = loss + loss_cfg.perceptual_weight * distance
                metrics['perceptual_loss'] = distance
            if self.use_disc:

                def adversarial(fake):  # non-saturating: the generator pushes its fakes towards "real"
                    logits = self.disc.apply({'params': params['disc'], **model_state['disc']}, fake, train=False)
                    return jnp.mean(jax.nn.softplus(-logits))

                # lax.cond: before adv_start the discriminator is not run at all.
                adv = jax.lax.cond(adv_on > 0, adversarial, lambda _: jnp.zeros((), jnp.float32), recon)
                loss = loss + adv_on * loss_cfg.adv_weight * adv
                metrics['adv_loss'] = adv
            metrics['loss'] = loss
            return loss, (metrics, new_vars, recon)

        (_, (metrics, new_vq_vars, recon)), vq_grads = jax.value_and_grad(vqgan_loss, has_aux=True)(params['vqgan'])
        grads = {'vqgan': vq_grads}
        new_state = {'vqgan': new_vq_vars}
        if self.use_disc:

            def disc_loss(disc_params):
                both = jnp.concatenate([x, jax.lax.stop_gradient(recon)])
                logits, new_vars = self.disc.apply(
                    {'params': disc_params, **model_state['disc']}, both, train=True, mutable=['batch_stats']
                )
                real, fake = jnp.split(logits, 2)
                return jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake)), new_vars

            def disc_update(_):
                (d_loss, new_vars), g = jax.value_and_grad(disc_loss, has_aux=True)(params['disc'])
                return d_loss, new_vars, g

            def no_disc_update(_):  # zero gradients: the discriminator's Adam makes no update
                return jnp.zeros((), jnp.float32), model_state['disc'], jax.tree.map(jnp.zeros_like, params['disc'])

            d_loss, new_disc_vars, grads['disc'] = jax.lax.cond(adv_on > 0, disc_update, no_disc_update, None)
            new_state['disc'] = new_disc_vars
            metrics['disc_loss'] = d_loss
        return grads, new_state, metrics

    # -- samples and evaluation ------------------------------------------------------------------

    def reconstruct(self, params: Any, model_state: Any, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] -> reconstructions from the continuous latents (as Würstchen v2 uses them)."""
        variables = {'params': params['vqgan'], **model_state['vqgan']}
        latent = self.vqgan.apply(variables, images, method=VQGAN.encode)
        return self.vqgan.apply(variables, latent, method=VQGAN.decode)

    def visualize(self, params: Any, model_state: Any, frozen: dict, batch: dict[str, jax.Array]) -> jax.Array:
        """Pairs of (input, reconstruction) side by side: [B, H, 2W, 3] in [-1, 1]."""
        del frozen
        recon = self.reconstruct(params, model_state, batch['image'])
        return jnp.concatenate([batch['image'], jnp.clip(recon, -1, 1)], axis=2)

    def _image_metrics(self, params: Any, model_state: Any, images: jax.Array) -> tuple[jax.Array, ...]:
        """Per-image PSNR of continuous and codebook reconstructions and the mean and mean square of the
        latent h: four [B] arrays."""
        variables = {'params': params['vqgan'], **model_state['vqgan']}
        h = self.vqgan.apply(variables, images, method=VQGAN.encode)
        codes = self.vqgan.apply(variables, h, method=VQGAN.quantize)[0]
        h32 = h.astype(jnp.float32)
        return (
            psnr(self.vqgan.apply(variables, h, method=VQGAN.decode), images),
            psnr(self.vqgan.apply(variables, codes, method=VQGAN.decode), images),
            jnp.mean(h32, axis=(1, 2, 3)),
            jnp.mean(jnp.square(h32), axis=(1, 2, 3)),
        )

    def evaluate(
        self, params: Networks, model_state: Networks, frozen: Networks, batches: HostBatches
    ) -> dict[str, float]:
        """Mean reconstruction PSNR over the held-out batches, continuous and through the codebook, and
        the std of the latent h over all its entries: the `stage_a.scale_factor` that gives the stages
        after it unit-variance latents (LDM's `scale_by_std`)."""
        del frozen
        per_image = [sharding.to_host(self._eval_images(params, model_state, jnp.asarray(b['image']))) for b in batches]
        cont, quant, mean, mean_square = (np.concatenate(column) for column in zip(*per_image))
        latent_std = np.sqrt(max(mean_square.mean() - mean.mean() ** 2, 0.0))
        return dict(
            psnr=float(cont.mean()),
            psnr_quantized=float(quant.mean()),
            latent_std=float(latent_std),
            num_images=len(cont),
        )
