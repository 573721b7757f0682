"""Stage C training: the text-conditional prior diffuses the semantic compressor's map of the image
(or, with `latents='stage_a'`, the image's Stage A latents: one diffusion stage, no Stage B).

`model.backbone` picks the denoiser: 'wuerstchen' (Würstchen's prior, `models/stage_c.py`),
'pixart' (PixArt-α's DiT, `models/pixart.py`, patches of `model.patch_size`, time scaled to its
0..1000 units) or 'stable_cascade' (Stable Cascade's Stage C UNet, `models/stable_cascade.py`, which reads
the pooled text embedding too), each behind a small adapter (`BACKBONES`: build, init, apply, extra batch fields), so
both train, sample and evaluate through the same task methods. PixArt's
`init.prior` may be a class-conditional DiT folder (the re-parameterised start, `convert/dit.py`), a
PixArt folder or `.pth`, or the workdir of an earlier Stage C run (the next stage of PixArt-α's
training plan, `configs/pixart_alpha.py`); `model.micro_conditions` adds PixArtMS's size and aspect
conditions, taken from the multi-aspect buckets of the input pipeline (`input.aspect_buckets`).

The effnet is frozen (from a Stage B run that trained it jointly, or from a converted weights
file); the text encoder is trained with the prior or frozen from a local CLIP folder. The map is
scaled as configured (`latent_scaling='v2'`: (x + 1)/42, Würstchen v2's space) before noising.
With `input.precomputed` (`python -m wurst_jax.precompute`) batches carry the scaled maps as
`latents` and a frozen encoder's `text_states`, and the step runs neither encoder: a frozen text
encoder's weights are not even read (caption dropout and guidance use the empty caption's states the
records came with), as PixArt-α trains on T5 features extracted once. Sampling a trained run from
prompts loads the encoder again.
"""

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from wurst_jax import convert
from wurst_jax.config_lib import ConfigError, validate_optimizer
from wurst_jax.convert.dit import pixart_from_dit
from wurst_jax.data import aspect_buckets, precomputed
from wurst_jax.diffusion import dpm_solver, iddpm, samplers, schedule
from wurst_jax.diffusion import loss as diffusion_loss
from wurst_jax.models.layers import REMAT_POLICIES
from wurst_jax.models.pixart import PixArtTransformer
from wurst_jax.models.stable_cascade import StableCascadeUNet
from wurst_jax.models.stage_c import WuerstchenPrior
from wurst_jax.tasks import conditioning
from wurst_jax.tasks.base import Batch, HostBatches, Metrics, Networks

LATENT_SPACES = ('effnet', 'stage_a')  # Würstchen's semantic map, or single-stage on Stage A latents
# 'cosine': continuous t in [0, 1] (Würstchen's); 'iddpm': improved DDPM's 1000 linear-β steps with a
# learned variance and the hybrid loss (PixArt-α's).
PROCESSES = ('cosine', 'iddpm')
IDDPM_SAMPLERS = ('dpm_solver', 'iddpm')  # DPM-Solver++(2M), or iDDPM's ancestral steps


class WuerstchenBackbone:
    """Würstchen's prior (`models/stage_c.py`): times in [0, 1] as they are, dropout in its blocks."""

    TIME_SCALE = 1.0  # our t in [0, 1] -> the network's time input
    TEXT_ARCHITECTURES = ('clip',)  # its cross-attention has no key mask

    @staticmethod
    def validate(config: ml_collections.ConfigDict) -> None:
        del config  # its fields are the ones every backbone has

    @staticmethod
    def build(task: 'StageCTask', source: str, dtype: Any) -> tuple[WuerstchenPrior, dict[str, Any]]:
        """(prior, pretrained params): fresh from config.model, or, fine-tuning, the checkpoint's
        architecture and weights."""
        m, c_in = task.config.model, task.latent_shape()[-1]
        if not source:
            return WuerstchenPrior(
                c_in=c_in,
                c=m.c,
                c_cond=task.text.width,
                c_r=m.c_r,
                depth=m.depth,
                num_heads=m.num_heads,
                dropout=m.dropout,
                scan_blocks=m.scan_blocks,
                remat_policy=m.remat_policy,
                pos_embed=m.pos_embed,
                linear_output=m.linear_output,
                dtype=dtype,
            ), {}
        prior, variables = convert.load_diffusers(
            source, 'prior', dropout=m.dropout, scan_blocks=m.scan_blocks, remat_policy=m.remat_policy, dtype=dtype
        )
        if (prior.c_cond, prior.c_in) != (task.text.width, c_in):
            raise ConfigError(
                'init.prior',
                source,
                f'a prior with c_cond={task.text.width} (the text encoder width) and c_in={c_in} '
                f'(the latent channels); it has c_cond={prior.c_cond}, c_in={prior.c_in}',
            )
        return prior, {'prior': variables['params']}

    @staticmethod
    def batch_fields(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
        del config
        return {}

    @staticmethod
    def init(
        module: WuerstchenPrior, rng: jax.Array, x: jax.Array, t: jax.Array, cond: jax.Array, micro: tuple | None
    ) -> Any:
        del micro
        return module.init(rng, x, t, cond)['params']

    @staticmethod
    def apply(
        module: WuerstchenPrior,
        params: Any,
        x: jax.Array,
        t: jax.Array,
        cond: jax.Array,
        dropout_rng: jax.Array | None,
        micro: tuple | None,
    ) -> jax.Array:
        del micro
        if dropout_rng is None:
            return module.apply({'params': params}, x, t, cond)
        return module.apply({'params': params}, x, t, cond, deterministic=False, rngs={'dropout': dropout_rng})


class PixArtBackbone:
    """PixArt-α's DiT (`models/pixart.py`): patches of model.patch_size, times in its 0..1000 DDPM
    units, no dropout; PixArtMS's size and aspect micro-conditions with model.micro_conditions."""

    TIME_SCALE = 1000.0  # our t in [0, 1] -> PixArt's timestep units
    TEXT_ARCHITECTURES = conditioning.TEXT_ARCHITECTURES  # CLIP's states, or T5's with their padding mask

    @staticmethod
    def validate(config: ml_collections.ConfigDict) -> None:
        m = config.model
        if m.c % 4:
            raise ConfigError('model.c', m.c, "a multiple of 4 for PixArt's 2-D sin-cos positions")
        if config.diffusion.process == 'iddpm' and config.diffusion.prediction != 'epsilon':
            raise ConfigError('diffusion.prediction', config.diffusion.prediction, "'epsilon' with process='iddpm'")
        if not (isinstance(m.patch_size, int) and m.patch_size > 0):
            raise ConfigError('model.patch_size', m.patch_size, 'a positive integer for PixArt')

    @staticmethod
    def build(task: 'StageCTask', source: str, dtype: Any) -> tuple[PixArtTransformer, dict[str, Any]]:
        """(PixArt, pretrained params): from scratch, from an earlier Stage C run of the training plan
        (its architecture and EMA weights, at this run's latent size), or with the architecture of a DiT
        folder (re-parameterised, PixArt-α paper §2.3) or PixArt checkpoint (diffusers folder or
        original .pth)."""
        m, micro, width = task.config.model, task.micro_conditions, task.text.width
        h, w, c = task.latent_shape()
        options = dict(scan_blocks=m.scan_blocks, remat_policy=m.remat_policy, dtype=dtype)
        pretrained = {}
        if not source:
            module = PixArtTransformer(
                in_channels=c,
                out_channels=2 * c if task.iddpm else c,
                num_heads=m.num_heads,
                head_dim=m.c // m.num_heads,
                depth=m.depth,
                patch_size=m.patch_size,
                sample_size=h,
                interpolation_scale=1,
                caption_channels=width,
                use_additional_conditions=micro,
                **options,
            )
        elif os.path.isdir(os.path.join(source, 'checkpoints')):  # the previous stage of the plan
            saved, params, _ = conditioning.trained_run(source, 'stage_c')
            previous = StageCTask(saved)
            if previous.backbone != 'pixart':
                raise ConfigError('init.prior', source, 'the workdir of a PixArt Stage C run')
            # Positions at this run's grid, unscaled, as PixArt-α's 512 px stage after its 256 px ones.
            module = previous.prior.clone(sample_size=h, use_additional_conditions=micro, **options)
            pretrained = {k: v for k, v in params.items() if k == 'prior' or task.text.trainable}
        elif convert.core.read_class_name(source) == 'DiTTransformer2DModel':
            module, variables = pixart_from_dit(source, caption_channels=width, **options)
            pretrained = {'prior': variables['params']}
        elif os.path.isfile(source):  # an original .pth: its architecture from its tensors, the heads from ours
            module, variables = convert.load_original(source, 'pixart', {'num_attention_heads': m.num_heads}, **options)
            pretrained = {'prior': variables['params']}
        else:
            module, variables = convert.load_diffusers(source, 'pixart', **options)
            pretrained = {'prior': variables['params']}
        if micro and module.width % 3:
            raise ConfigError(
                'model.micro_conditions',
                True,
                f'False for a PixArt of width {module.width}: '
                'its size and aspect embeddings take a third of the width each',
            )
        found = (module.in_channels, module.caption_channels, module.use_additional_conditions)
        outs = (2 * c,) if task.iddpm else (c, 2 * c)  # iDDPM reads the learned-variance half
        if found != (c, width, micro) or module.out_channels not in outs:
            raise ConfigError(
                'init.prior',
                source,
                f'a DiT/PixArt with in_channels={c} (the latent channels; out_channels in {outs}, '
                f'{2 * c} with learned variance, which diffusion.process=iddpm needs), caption_channels={width} '
                f'and use_additional_conditions={micro} (model.micro_conditions); '
                f'it has {found} and out_channels={module.out_channels}',
            )
        if task.config.input.aspect_buckets:
            task.check_bucket_latents(module.patch_size)
        return module, pretrained

    @staticmethod
    def batch_fields(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
        """PixArtMS's micro-conditions, which the multi-aspect buckets carry."""
        if not config.model.micro_conditions:
            return {}
        return {'original_size': ((2,), jnp.float32), 'aspect_ratio': ((1,), jnp.float32)}

    @staticmethod
    def init(
        module: PixArtTransformer, rng: jax.Array, x: jax.Array, t: jax.Array, cond: jax.Array, micro: tuple | None
    ) -> Any:
        states, mask = _states_and_mask(cond)
        return module.init(rng, x, t, states, mask, *(micro or ()))['params']

    @staticmethod
    def apply(
        module: PixArtTransformer,
        params: Any,
        x: jax.Array,
        t: jax.Array,
        cond: jax.Array,
        dropout_rng: jax.Array | None,
        micro: tuple | None,
    ) -> jax.Array:
        del dropout_rng  # no dropout in PixArt's blocks
        return module.apply({'params': params}, x, t, *_states_and_mask(cond), *(micro or ()))


class StableCascadeBackbone:
    """Stable Cascade's Stage C (`models/stable_cascade.py`): two levels of model.c channels at the map's own
    resolution, model.level_blocks (ResBlock, TimestepBlock, AttnBlock) triplets down and mirrored up, reading
    CLIP's text states, its pooled embedding and a CLIP image embedding of model.clip_image_channels. The image
    embedding is zeros here (text-to-image, as StableCascadePriorPipeline passes without an image); times in [0, 1]."""

    TIME_SCALE = 1.0
    TEXT_ARCHITECTURES = ('clip',)
    POOLED_TEXT = True

    @staticmethod
    def validate(config: ml_collections.ConfigDict) -> None:
        m = config.model
        blocks = tuple(m.level_blocks)
        if len(blocks) != 2 or not all(isinstance(n, int) and n > 0 for n in blocks):
            raise ConfigError('model.level_blocks', m.level_blocks, 'two positive integers (Stable Cascade: (8, 24))')
        if not (isinstance(m.clip_image_channels, int) and m.clip_image_channels > 0):
            raise ConfigError('model.clip_image_channels', m.clip_image_channels, 'a positive integer (768)')
        if config.input.precomputed:
            raise ConfigError(
                'input.precomputed',
                config.input.precomputed,
                "'' for backbone=stable_cascade (precomputed records hold no pooled text embedding)",
            )

    @staticmethod
    def build(task: 'StageCTask', source: str, dtype: Any) -> tuple[StableCascadeUNet, dict[str, Any]]:
        """(UNet, pretrained params): fresh from config.model, or the architecture and weights of a diffusers
        StableCascadeUNet prior folder or an original stage_c*.safetensors file."""
        m, c = task.config.model, task.latent_shape()[-1]
        text, pooled = task.text.width, task.text.pooled_width
        options = dict(dropout=m.dropout, scan_blocks=m.scan_blocks, remat_policy=m.remat_policy, dtype=dtype)
        if not source:
            levels = tuple(m.level_blocks)
            return StableCascadeUNet(
                in_channels=c,
                out_channels=c,
                timestep_ratio_embedding_dim=m.c_r,
                conditioning_dim=m.c,
                block_out_channels=(m.c, m.c),
                num_attention_heads=(m.num_heads, m.num_heads),
                down_num_layers_per_block=levels,
                up_num_layers_per_block=levels[::-1],
                clip_text_in_channels=text,
                clip_text_pooled_in_channels=pooled,
                clip_image_in_channels=m.clip_image_channels,
                switch_level=(False,),
                **options,
            ), {}
        module, variables = convert.load_diffusers(source, 'stable_cascade_unet', **options)
        found = (module.in_channels, module.out_channels, module.clip_text_in_channels)
        if found + (module.clip_text_pooled_in_channels,) != (c, c, text, pooled) or not module.clip_image_in_channels:
            raise ConfigError(
                'init.prior',
                source,
                f'a Stable Cascade Stage C with in/out_channels={c} (the latent channels), clip_text_in_channels='
                f'{text} and clip_text_pooled_in_channels={pooled} (the text encoder) and an image mapper; it has '
                f'{found}, pooled {module.clip_text_pooled_in_channels}, image {module.clip_image_in_channels}',
            )
        return module, {'prior': variables['params']}

    @staticmethod
    def batch_fields(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
        del config
        return {}

    @staticmethod
    def _no_image(module: StableCascadeUNet, cond: conditioning.PooledStates) -> jax.Array:
        return jnp.zeros((cond.pooled.shape[0], 1, module.clip_image_in_channels), cond.pooled.dtype)

    @staticmethod
    def init(
        module: StableCascadeUNet, rng: jax.Array, x: jax.Array, t: jax.Array, cond: Any, micro: tuple | None
    ) -> Any:
        del micro
        image = StableCascadeBackbone._no_image(module, cond)
        return module.init(rng, x, t, cond.pooled, cond.states, image)['params']

    @staticmethod
    def apply(
        module: StableCascadeUNet,
        params: Any,
        x: jax.Array,
        t: jax.Array,
        cond: Any,
        dropout_rng: jax.Array | None,
        micro: tuple | None,
    ) -> jax.Array:
        del micro
        args = (x, t, cond.pooled, cond.states, StableCascadeBackbone._no_image(module, cond))
        if dropout_rng is None:
            return module.apply({'params': params}, *args)
        return module.apply({'params': params}, *args, deterministic=False, rngs={'dropout': dropout_rng})


def _states_and_mask(cond: Any) -> tuple[jax.Array, jax.Array | None]:
    """PixArt's (text states, key mask or None) from a CLIP encoder's states or a T5 encoder's MaskedStates."""
    return tuple(cond) if isinstance(cond, conditioning.MaskedStates) else (cond, None)


# model.backbone -> its adapter: how the denoiser is built, initialised and called.
BACKBONES = {'wuerstchen': WuerstchenBackbone, 'pixart': PixArtBackbone, 'stable_cascade': StableCascadeBackbone}


class StageCTask(conditioning.CaptionedTask):
    """The text-conditional prior (Würstchen's or PixArt-α's) on effnet maps or Stage A latents."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.text_precomputed = bool(config.input.precomputed) and config.text.encoder != 'train'
        pooled = getattr(BACKBONES.get(config.model.backbone), 'POOLED_TEXT', False)
        super().__init__(config, load_text_weights=not self.text_precomputed, pooled_text=pooled)
        if self.text_precomputed:  # a plan (shapes only) reads no records: any states of their shape
            planned = convert.reading_shapes_only()
            self._empty_caption = self.text.placeholder() if planned else self._read_empty_caption()
        self.space = config.latents
        if self.space == 'stage_a':
            self.vqgan, self._vqgan_variables = conditioning.load_stage_a(config.stage_a)
        else:
            self.effnet, self._effnet_variables = conditioning.load_effnet(config.effnet.source, self.dtype)
        self.backbone = config.model.backbone
        d = config.diffusion
        # iDDPM's discrete process (PixArt-α): integer steps, the network's second half of channels the variance.
        self.iddpm = iddpm.make_schedule(iddpm.linear_betas(d.num_steps)) if d.process == 'iddpm' else None
        self.sampler_choices = IDDPM_SAMPLERS if self.iddpm else samplers.SAMPLERS
        self.micro_conditions = config.model.micro_conditions
        self._backbone = BACKBONES[self.backbone]
        self.prior, self._pretrained = self._backbone.build(self, config.init.prior, self.dtype)
        self._eval_losses = jax.jit(self._held_out_losses)

    def _read_empty_caption(self) -> jax.Array | conditioning.MaskedStates:
        """[1, L, D] states of the empty caption (with T5's mask) that input.precomputed came with."""
        empty = precomputed.read_empty_caption(self.config.input.precomputed)
        states = jnp.asarray(empty['text_states'])[None]
        if not self.text.masked:
            return states
        return conditioning.MaskedStates(states, jnp.asarray(empty['text_mask'], bool)[None])

    def check_bucket_latents(self, patch_size: int) -> None:
        """Every aspect bucket's latent sides must be whole PixArt patches. Checked here, from shapes
        alone, because a bucket's step is compiled when its first batch comes, mid-run."""
        size, multiple = self.config.input.image_size, self.config.input.bucket_multiple
        frozen = self.frozen_params()
        latent_side = {}  # each latent side depends on one image side only
        for side in sorted({s for _, h, w in aspect_buckets.bucket_table(size, multiple) for s in (h, w)}):
            images = jax.ShapeDtypeStruct((1, side, size, 3), jnp.float32)
            latent_side[side] = jax.eval_shape(self.latents, frozen, images).shape[1]
        bad = {side: n for side, n in latent_side.items() if n % patch_size}
        if bad:
            pixels = size * patch_size / latent_side[size] if size in latent_side else None
            hint = f' (here a multiple of {pixels:g} pixels)' if pixels and pixels == int(pixels) else ''
            raise ConfigError(
                'input.bucket_multiple',
                multiple,
                f'a value whose bucket sides give latent sides divisible by the patch size '
                f'{patch_size}{hint}; bucket sides {sorted(bad)} give latent sides '
                f'{[bad[k] for k in sorted(bad)]}',
            )

    @staticmethod
    def validate(config: ml_collections.ConfigDict) -> None:
        m = config.model
        for field in ('c', 'depth', 'num_heads', 'c_r'):
            if not (isinstance(m[field], int) and m[field] > 0):
                raise ConfigError(f'model.{field}', m[field], 'a positive integer')
        if m.c % m.num_heads:
            raise ConfigError('model.num_heads', m.num_heads, f'a divisor of model.c={m.c}')
        if m.remat_policy not in REMAT_POLICIES:
            raise ConfigError('model.remat_policy', m.remat_policy, f'one of {sorted(REMAT_POLICIES)}')
        backbone = m.backbone
        if backbone not in BACKBONES:
            raise ConfigError('model.backbone', backbone, f'one of {sorted(BACKBONES)}')
        BACKBONES[backbone].validate(config)
        s = config.sample
        if not s.get('prior_shift', 1.0) > 0:
            raise ConfigError('sample.prior_shift', s.prior_shift, 'a positive number (1: no shift; Stable Cascade: 2)')
        if not 0 <= s.get('prior_cfg_rescale', 0.0) <= 1:
            raise ConfigError(
                'sample.prior_cfg_rescale', s.prior_cfg_rescale, 'a value in [0, 1] (Stable Cascade: 0.7)'
            )
        d = config.diffusion
        if d.process not in PROCESSES:
            raise ConfigError('diffusion.process', d.process, f'one of {PROCESSES}')
        if d.process == 'iddpm':
            if backbone != 'pixart':
                raise ConfigError(
                    'diffusion.process', d.process, "'cosine' for the Würstchen prior (iDDPM is PixArt's)"
                )
            if d.sampler not in IDDPM_SAMPLERS:
                raise ConfigError('diffusion.sampler', d.sampler, f'one of {IDDPM_SAMPLERS} with process=iddpm')
            if not (isinstance(d.num_steps, int) and d.num_steps > 1):
                raise ConfigError('diffusion.num_steps', d.num_steps, 'an integer > 1 (PixArt-α: 1000)')
        space = config.latents
        if space not in LATENT_SPACES:
            raise ConfigError('latents', space, f'one of {LATENT_SPACES}')
        if space == 'stage_a':
            conditioning.validate_stage_a(config.stage_a)
            if config.latent_scaling != 'none':
                raise ConfigError(
                    'latent_scaling',
                    config.latent_scaling,
                    "'none' with latents='stage_a' (Stage A latents are divided by stage_a.scale_factor)",
                )
        elif not os.path.exists(config.effnet.source):
            raise ConfigError(
                'effnet.source',
                config.effnet.source,
                'a Stage B workdir, an effnet model folder or an effnet checkpoint file',
            )
        if config.init.prior and not os.path.exists(config.init.prior):
            raise ConfigError(
                'init.prior',
                config.init.prior,
                "'' or a diffusers prior folder / checkpoint file (PixArt: a DiT or PixArt folder, "
                'a PixArt .pth, or the workdir of an earlier Stage C run)',
            )
        if config.input.precomputed:
            if config.input.aspect_buckets:
                raise ConfigError('input.aspect_buckets', True, 'False with input.precomputed (fixed-size records)')
            try:
                precomputed.check_matches(config)
            except FileNotFoundError as e:
                raise ConfigError('input.precomputed', config.input.precomputed, f'a precompute output folder ({e})')
        if config.latent_scaling not in conditioning.LATENT_SCALINGS:
            raise ConfigError('latent_scaling', config.latent_scaling, f'one of {conditioning.LATENT_SCALINGS}')
        if d.process == 'iddpm':
            conditioning.validate_text(config.text, BACKBONES[backbone].TEXT_ARCHITECTURES)
            validate_optimizer(config, 'optimizer')
        else:
            conditioning.validate_diffusion(config, BACKBONES[backbone].TEXT_ARCHITECTURES)

    # -- state -----------------------------------------------------------------------------------

    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        if not self.config.input.precomputed:
            return {**conditioning.captioned_batch_spec(self.config), **self._backbone.batch_fields(self.config)}
        spec = {'latents': (self.latent_shape(), jnp.float32)}
        if self.text.trainable:
            spec.update({k: v for k, v in conditioning.captioned_batch_spec(self.config).items() if k != 'image'})
        else:
            spec['text_states'] = ((self.config.text.max_length, self.text.width), jnp.float32)
            if self.text.masked:
                spec['text_mask'] = ((self.config.text.max_length,), jnp.int32)
        return spec

    def latent_shape(self, image_hw: tuple[int, int] | None = None) -> tuple[int, int, int]:
        """(h, w, c) of the Stage C latents of images of image_hw (square input.image_size by default)."""
        size = self.config.input.image_size
        images = jax.ShapeDtypeStruct((1, *(image_hw or (size, size)), 3), jnp.float32)
        return jax.eval_shape(lambda v, x: self.latents(v, x), self.frozen_params(), images).shape[1:]

    def effnet_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """The effnet's input size for images of image_hw: effnet.image_size for input.image_size, in proportion."""
        scale = self.config.effnet.image_size / self.config.input.image_size
        return round(image_hw[0] * scale), round(image_hw[1] * scale)

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        prior_rng, text_rng = jax.random.split(rng)
        h, w, c = self.latent_shape()
        x, t, cond = jnp.zeros((1, h, w, c)), jnp.zeros((1,)), self.text.placeholder()
        params = {'prior': self._backbone.init(self.prior, prior_rng, x, t, cond, self.micro(None, 1))}
        if self.text.trainable:
            params['text'] = self.text.init(text_rng)
        state = {'loss_buckets': schedule.adaptive_init()} if self.config.diffusion.loss_weight == 'adaptive' else {}
        return params, state

    def pretrained_params(self) -> dict[str, Any]:
        """The networks config.init.prior starts from: a converted prior to fine-tune, a DiT start, or an
        earlier run of the PixArt training plan."""
        return self._pretrained

    def frozen_params(self) -> dict[str, Any]:
        frozen = {'stage_a': self._vqgan_variables} if self.space == 'stage_a' else {'effnet': self._effnet_variables}
        text = {'text_empty': self._empty_caption} if self.text_precomputed else self.text.frozen_params()
        return {**frozen, **text}

    # -- training --------------------------------------------------------------------------------

    def latents(self, frozen: dict, images: jax.Array) -> jax.Array:
        """x0 of images [B, H, W, 3]: their Stage A latents, or their scaled effnet map."""
        if self.space == 'stage_a':
            return conditioning.stage_a_latents(self.vqgan, frozen['stage_a'], images)
        z = conditioning.effnet_latents(self.effnet, frozen['effnet'], images, self.effnet_size(images.shape[1:3]))
        return conditioning.scale_latents(z, self.config.latent_scaling)

    def decode(self, frozen: dict, latents: jax.Array) -> jax.Array:
        """Images in [-1, 1] from sampled Stage A latents (latents='stage_a': no Stage B)."""
        return conditioning.stage_a_decode(self.vqgan, frozen['stage_a'], latents)

    def micro(
        self, batch: dict[str, jax.Array] | None, batch_size: int, image_hw: tuple[int, int] | None = None
    ) -> tuple[jax.Array, jax.Array] | None:
        """PixArtMS's (image size (h, w) [B, 2], aspect ratio h / w [B, 1]): the batch's, else those of
        image_hw (a square input.image_size by default)."""
        if not self.micro_conditions:
            return None
        if batch is not None and 'original_size' in batch:
            return batch['original_size'], batch['aspect_ratio']
        size = self.config.input.image_size
        h, w = image_hw or (size, size)
        return jnp.tile(jnp.array([[h, w]], jnp.float32), (batch_size, 1)), jnp.full((batch_size, 1), h / w)

    def batch_latents(self, frozen: dict, batch: dict[str, jax.Array]) -> jax.Array:
        """x0: the batch's precomputed latents, or the effnet map of its images."""
        return batch['latents'] if 'latents' in batch else self.latents(frozen, batch['image'])

    def batch_text(self, params: Any, frozen: dict, batch: dict[str, jax.Array], drop_rng: jax.Array | None = None):
        """The prior's text conditioning of the batch, with caption dropout when `drop_rng` is given."""
        if 'text_states' in batch:
            states = batch['text_states']
            if self.text.masked:
                states = conditioning.MaskedStates(states, batch['text_mask'].astype(bool))
            return states if drop_rng is None else self.text.drop_states(drop_rng, states, frozen['text_empty'])
        text_params = self.text.params(params, frozen)
        tokens, mask = batch['tokens'], batch['token_mask']
        if drop_rng is not None:
            tokens, mask = self.text.drop(drop_rng, tokens, mask)
        return self.text.encode(text_params, tokens, mask)

    def grads(
        self, params: Networks, model_state: Networks, frozen: Networks, batch: Batch, rng: jax.Array, step: jax.Array
    ) -> tuple[Networks, Networks, Metrics]:
        del step
        if self.iddpm is not None:
            return self._iddpm_grads(params, model_state, frozen, batch, rng)
        d = self.config.diffusion
        t_rng, noise_rng, drop_rng, dropout_rng = jax.random.split(rng, 4)
        x0 = jax.lax.stop_gradient(self.batch_latents(frozen, batch))
        t = schedule.sample_t(t_rng, x0.shape[0], d.t_sampling)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        x_t = schedule.add_noise(x0, noise, t)

        target = diffusion_loss.target(d.prediction, x0, noise, t)

        def loss_fn(p):
            cond = self.batch_text(p, frozen, batch, drop_rng)
            out = self.prior_output(p['prior'], x_t, t, cond, dropout_rng, self.micro(batch, x0.shape[0]))
            return diffusion_loss.epsilon_loss(out, target, t, d.loss_weight, model_state.get('loss_buckets'), d.p2_k)

        (loss, raw), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new_state = model_state
        if d.loss_weight == 'adaptive':
            new_state = {'loss_buckets': schedule.adaptive_update(model_state['loss_buckets'], t, raw)}
        return grads, new_state, dict(loss=loss, mse=jnp.mean(raw))

    def _iddpm_grads(
        self, params: Networks, model_state: Networks, frozen: Networks, batch: Batch, rng: jax.Array
    ) -> tuple[Networks, Networks, Metrics]:
        """PixArt-α's step: t uniform over the steps, the hybrid loss L_simple + L_vb (iDDPM §3.1)."""
        sched = self.iddpm
        t_rng, noise_rng, drop_rng, dropout_rng = jax.random.split(rng, 4)
        x0 = jax.lax.stop_gradient(self.batch_latents(frozen, batch))
        t = iddpm.sample_t(t_rng, x0.shape[0], sched.num_steps)
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        x_t = iddpm.q_sample(sched, x0, t, noise)

        def loss_fn(p):
            cond = self.batch_text(p, frozen, batch, drop_rng)
            out = self.prior_output(p['prior'], x_t, t, cond, dropout_rng, self.micro(batch, x0.shape[0]))
            loss, terms = iddpm.hybrid_loss(sched, out.astype(jnp.float32), x0, x_t, t, noise)
            return jnp.mean(loss), terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, model_state, dict(loss=loss, mse=jnp.mean(terms['mse']), vb=jnp.mean(terms['vb']))

    # -- sampling and evaluation -----------------------------------------------------------------

    def prior_output(
        self,
        prior_params: Any,
        x: jax.Array,
        t: jax.Array,
        cond: jax.Array,
        dropout_rng: jax.Array | None = None,
        micro: tuple | None = None,
    ) -> jax.Array:
        """The backbone's raw prediction for noisy maps x [B, h, w, c] at times t [B]: ε or v at t in [0, 1],
        or with iDDPM ε and the variance values [B, h, w, 2c] at integer steps; `micro` are PixArtMS's size
        conditions (`self.micro`)."""
        if self.iddpm is not None:
            return self._backbone.apply(self.prior, prior_params, x, t.astype(jnp.float32), cond, dropout_rng, micro)
        t_in = self._backbone.TIME_SCALE * t
        out = self._backbone.apply(self.prior, prior_params, x, t_in, cond, dropout_rng, micro)
        return out[..., : x.shape[-1]]  # a DiT start's learned-variance half is not trained here

    def epsilon(
        self,
        params: Any,
        x: jax.Array,
        t: jax.Array,
        cond: jax.Array,
        batch: dict[str, jax.Array] | None = None,
        image_hw: tuple[int, int] | None = None,
    ) -> jax.Array:
        """The prior's noise estimate ε̂ (converted from v̂ when diffusion.prediction='v'; iDDPM's first
        half of channels); a batch, else image_hw, gives the size micro-conditions, if any."""
        out = self.prior_output(params['prior'], x, t, cond, micro=self.micro(batch, x.shape[0], image_hw))
        if self.iddpm is not None:
            return out[..., : x.shape[-1]]
        return diffusion_loss.to_epsilon(self.config.diffusion.prediction, out, x, t)

    def denoiser(self, params: Any, cond: jax.Array, uncond: jax.Array, image_hw: tuple[int, int] | None = None):
        """`denoise(x, t, conditional)` for samplers.sample_guided: None = [conditional; unconditional] halves."""

        def denoise(x, t, conditional):
            halves = cond if conditional else conditioning.concat_halves(cond, uncond)
            return self.epsilon(params, x, t, halves, image_hw=image_hw)

        return denoise

    def sample(
        self,
        params: Networks,
        frozen: Networks,
        tokens: jax.Array,
        mask: jax.Array,
        rng: jax.Array,
        *,
        negative: tuple[jax.Array, jax.Array] | None = None,
        **kwargs,
    ) -> jax.Array:
        """Stage C latents for the captions, unscaled into the effnet's raw space (or Stage A latents):
        [B, h, w, c]; `negative` (tokens, mask) [1, L] is the unconditional half's caption (the empty
        caption's by default); other keyword arguments as `sample_from_states`."""
        cond, uncond = self.text.encode_for_guidance(params, frozen, tokens, mask, negative)
        return self.sample_from_states(params, cond, uncond, rng, **kwargs)

    def sample_from_states(
        self,
        params: Any,
        cond: jax.Array,
        uncond: jax.Array,
        rng: jax.Array,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        sampler: str | None = None,
        image_hw: tuple[int, int] | None = None,
    ) -> jax.Array:
        """`sample` given the text states of the captions and of the unconditional caption; `steps`,
        `guidance` and `sampler` default to the config's, `image_hw` (the images' size the latents are
        for) to a square input.image_size."""
        s = self.config.sample
        h, w, c = self.latent_shape(image_hw)
        init_rng, rng = jax.random.split(rng)
        x = jax.random.normal(init_rng, (conditioning.batch_size(cond), h, w, c), jnp.float32)
        guidance = s.prior_guidance if guidance is None else guidance
        sampler = sampler or self.config.diffusion.sampler
        if self.iddpm is not None:
            x = self._sample_iddpm(params, cond, uncond, x, rng, steps or s.prior_steps, guidance, sampler, image_hw)
            return conditioning.unscale_latents(x, self.config.latent_scaling)
        timesteps = (
            samplers.default_stage_c_timesteps()
            if s.prior_timesteps == 'stage_c_default'
            else samplers.linspace_timesteps(steps or s.prior_steps)
        )
        denoise = self.denoiser(params, cond, uncond, image_hw)
        # .get: runs saved before the shift and rescale fields existed sampled with neither.
        shift, rescale = s.get('prior_shift', 1.0), s.get('prior_cfg_rescale', 0.0)
        x = samplers.sample_guided(denoise, x, rng, timesteps, guidance, sampler, shift, rescale)
        return conditioning.unscale_latents(x, self.config.latent_scaling)

    def _sample_iddpm(
        self,
        params: Any,
        cond: jax.Array,
        uncond: jax.Array,
        x: jax.Array,
        rng,
        steps: int,
        guidance: float,
        sampler,
        image_hw: tuple[int, int] | None,
    ) -> jax.Array:
        """iDDPM-process sampling from noise x [B, h, w, c]: DPM-Solver++(2M) over `steps` (diffusers'
        PixArtAlphaPipeline) or iDDPM's ancestral steps respaced to `steps` (PixArt-α's `p_sample_loop`).
        Guidance mixes the ε halves of one doubled call; the variance is the conditional half's."""
        c = x.shape[-1]

        def predict(x, t):
            if guidance == 1.0:
                return self.prior_output(params['prior'], x, t, cond, micro=self.micro(None, x.shape[0], image_hw))
            both = self.prior_output(
                params['prior'],
                jnp.concatenate([x, x]),
                jnp.concatenate([t, t]),
                conditioning.concat_halves(cond, uncond),
                micro=self.micro(None, 2 * x.shape[0], image_hw),
            )
            out_c, out_u = jnp.split(both.astype(jnp.float32), 2)
            eps = samplers.guidance(out_u[..., :c], out_c[..., :c], guidance)
            return jnp.concatenate([eps, out_c[..., c:]], axis=-1)

        if sampler == 'dpm_solver':
            timesteps = dpm_solver.timesteps(steps, self.iddpm.num_steps)
            return dpm_solver.sample(lambda x, t: predict(x, t)[..., :c], x, self.iddpm.alphas_cumprod, timesteps)
        return iddpm.ancestral_sample(predict, x, rng, iddpm.respace(self.iddpm.betas, steps))

    def visualize(self, params: Any, model_state: Any, frozen: dict, batch: dict[str, jax.Array]) -> jax.Array:
        """The effnet map of each image beside the map sampled from its caption (first 3 channels);
        single-stage, the image beside the decoded sample."""
        del model_state
        real = conditioning.unscale_latents(self.batch_latents(frozen, batch), self.config.latent_scaling)
        if 'text_states' in batch:
            cond = self.batch_text(params, frozen, batch)
            uncond = conditioning.broadcast_to_captions(frozen['text_empty'], cond)
            fake = self.sample_from_states(params, cond, uncond, jax.random.key(0))
        else:
            fake = self.sample(params, frozen, batch['tokens'], batch['token_mask'], jax.random.key(0))
        if self.space == 'stage_a':
            return jnp.clip(jnp.concatenate([self.decode(frozen, real), self.decode(frozen, fake)], axis=2), -1, 1)
        pair = jnp.concatenate([real, fake], axis=2)[..., :3]
        pair = pair / (jnp.max(jnp.abs(real[..., :3]), axis=(1, 2, 3), keepdims=True) + 1e-6)
        scale = max(1, self.config.input.image_size // real.shape[1])
        return jnp.clip(jnp.repeat(jnp.repeat(pair, scale, axis=1), scale, axis=2), -1, 1)

    def _held_out_losses(self, params: Any, model_state: Any, frozen: dict, batch: dict) -> jax.Array:
        del model_state
        x0 = self.batch_latents(frozen, batch)
        cond = self.batch_text(params, frozen, batch)
        denoise = functools.partial(self.epsilon, params, cond=cond, batch=batch)
        if self.iddpm is None:
            return diffusion_loss.fixed_time_losses(denoise, x0)
        steps = self.iddpm.num_steps  # the same fractions of the process, as its integer steps
        times = tuple(round(e * (steps - 1)) for e in diffusion_loss.EVAL_TIMES)
        add_noise = lambda x0, noise, t: iddpm.q_sample(self.iddpm, x0, t, noise)
        return diffusion_loss.fixed_time_losses(denoise, x0, times=times, add_noise=add_noise)

    def evaluate(
        self, params: Networks, model_state: Networks, frozen: Networks, batches: HostBatches
    ) -> dict[str, float]:
        """Unweighted ε-MSE on held-out images at fixed noise levels and noise."""
        return conditioning.evaluate_held_out(
            self._eval_losses, params, model_state, frozen, batches, self.batch_spec()
        )
