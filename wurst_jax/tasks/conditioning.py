"""What the text-conditional families (both Stage Bs, Stage C, the pixel family) share: the text encoder
(trained with the stage, or frozen from a local CLIP folder), caption dropout for classifier-free
guidance, the validation of their diffusion, text and optimizer fields, the semantic compressor (trained
with a Stage B, or frozen), frozen networks loaded from another run or a weights file (Stage A's VQGAN
with the latent and token spaces it defines), and two base classes: `CaptionedTask` (config, text
encoder, captioned batches, AdamW) and `DecoderTask` (what both Stage Bs add to it)."""

import contextlib
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from wurst_jax import checkpoint, convert, optim, sharding
from wurst_jax.config_lib import ConfigError, validate_optimizer
from wurst_jax.diffusion import loss as diffusion_loss
from wurst_jax.diffusion import samplers, schedule
from wurst_jax.models.clip import CLIPTextModel
from wurst_jax.models.effnet import EFFNET_ARCHS, EfficientNetEncoder
from wurst_jax.models.layers import DTYPES, REMAT_POLICIES
from wurst_jax.models.resize import resize
from wurst_jax.models.stage_a import VQGAN
from wurst_jax.models.t5 import T5Encoder
from wurst_jax.tokenizer import create_tokenizer

HIDDEN_STATES = ('last', 'penultimate')  # Würstchen: after the final LN; Stable Cascade: hidden_states[-1]
DROPOUT_MODES = ('batch', 'sample')
# CLIP's text transformer (Würstchen, Stable Cascade), or T5's encoder with its padding mask (PixArt-α).
TEXT_ARCHITECTURES = ('clip', 't5')
_CONVERTED_NAMES = {'clip': 'clip_text', 't5': 't5_encoder'}  # wurst_jax.convert's component names


class MaskedStates(NamedTuple):
    """A T5 encoder's text conditioning: the states and which of them are real tokens, as PixArt-α's
    cross-attention reads them (padded keys masked)."""

    states: jax.Array  # [B, L, D]
    mask: jax.Array  # [B, L] bool


class PooledStates(NamedTuple):
    """CLIP's text conditioning for Stable Cascade's Stage C: the token states and the pooled embedding
    (`text_embeds` of a CLIPTextModelWithProjection, else the pooler output) as one token."""

    states: jax.Array  # [B, L, D]
    pooled: jax.Array  # [B, 1, P]


def validate_text(text: ml_collections.ConfigDict, architectures: tuple[str, ...] = ('clip',)) -> None:
    """config.text; `architectures` are the text encoders the family's denoiser can read."""
    if text.architecture not in architectures:
        raise ConfigError('text.architecture', text.architecture, f'one of {architectures} for this model')
    if text.architecture == 't5' and text.hidden_state != 'last':
        raise ConfigError('text.hidden_state', text.hidden_state, "'last' for a T5 encoder")
    if text.hidden_state not in HIDDEN_STATES:
        raise ConfigError('text.hidden_state', text.hidden_state, f'one of {HIDDEN_STATES}')
    if text.dropout_mode not in DROPOUT_MODES:
        raise ConfigError('text.dropout_mode', text.dropout_mode, f'one of {DROPOUT_MODES}')
    if not 0 <= text.dropout < 1:
        raise ConfigError('text.dropout', text.dropout, 'a probability in [0, 1)')
    if text.encoder == 'train' and text.tokenizer not in ('bytes', 'words'):
        raise ConfigError('text.tokenizer', text.tokenizer, "'bytes' or 'words' when text.encoder='train'")
    if text.tokenizer == 'words' and not text.vocabulary:
        raise ConfigError('text.vocabulary', text.vocabulary, "the list of words when text.tokenizer='words'")
    if text.encoder != 'train' and not os.path.isdir(text.encoder):
        raise ConfigError(
            'text.encoder',
            text.encoder,
            f"'train', or a local transformers {text.architecture.upper()} text encoder folder (config.json + "
            '*.safetensors)',
        )
    if text.tokenizer not in ('bytes', 'words') and not os.path.isfile(os.path.join(text.tokenizer, 'tokenizer.json')):
        raise ConfigError('text.tokenizer', text.tokenizer, "'bytes', 'words', or a local folder with tokenizer.json")


class TextConditioner:
    """Tokenizer + text encoder (CLIP's, or T5's giving `MaskedStates`); `trainable` when
    config.text.encoder == 'train'.

    config.text: architecture ('clip' or 't5'), tokenizer ('bytes', 'words' of text.vocabulary, or a
    local model folder), max_length, encoder ('train' or a local transformers text encoder folder, used
    frozen), encoder_config (the CLIPTextConfig / T5Config fields of a trained encoder), hidden_state,
    dropout and dropout_mode (caption -> "" for CFG). `load_weights=False` reads only a frozen
    encoder's config.json: for runs on its precomputed states, which never run it.
    """

    def __init__(
        self, text: ml_collections.ConfigDict, dtype: Any = jnp.float32, load_weights: bool = True, pooled: bool = False
    ):
        self.config = text
        self.masked = text.architecture == 't5'
        self.pooled = pooled  # PooledStates, for a denoiser that reads the pooled embedding too
        self.tokenizer = create_tokenizer(text.tokenizer, text.max_length, text.vocabulary)
        self.trainable = text.encoder == 'train'
        if self.trainable:
            self.module, self._frozen = self._trained_module(dtype), None
        else:
            name = _CONVERTED_NAMES[text.architecture]
            with contextlib.nullcontext() if load_weights else convert.shapes_only():
                self.module, self._frozen = convert.load_diffusers(text.encoder, name, dtype=dtype)
        empty = self.tokenizer([''])
        self.empty_tokens, self.empty_mask = empty['input_ids'][0], empty['attention_mask'][0]

    def _trained_module(self, dtype: Any) -> CLIPTextModel | T5Encoder:
        fields = self.config.encoder_config.to_dict()
        if self.masked:
            return T5Encoder(vocab_size=self.tokenizer.vocab_size, dtype=dtype, **fields)
        return CLIPTextModel(
            vocab_size=self.tokenizer.vocab_size,
            max_position_embeddings=self.config.max_length,
            eos_token_id=self.tokenizer.eos_token_id,
            projection_dim=None,
            dtype=dtype,
            **fields,
        )

    @property
    def width(self) -> int:
        return self.module.d_model if self.masked else self.module.hidden_size

    @property
    def pooled_width(self) -> int:
        """The width of the pooled embedding: CLIP's projection, else its hidden size."""
        return getattr(self.module, 'projection_dim', None) or self.width

    def placeholder(self, batch: int = 1) -> jax.Array | MaskedStates | PooledStates:
        """Zero states of `batch` captions (what shapes a denoiser's init), masked like a T5 encoder's."""
        states = jnp.zeros((batch, self.config.max_length, self.width))
        if self.pooled:
            return PooledStates(states, jnp.zeros((batch, 1, self.pooled_width)))
        return MaskedStates(states, jnp.ones(states.shape[:2], bool)) if self.masked else states

    def init(self, rng: jax.Array) -> Any:
        return self.module.init(rng, jnp.zeros((1, self.config.max_length), jnp.int32))['params']

    def frozen_params(self) -> dict:
        """{'text': params} of a frozen encoder, {} of one trained with the stage."""
        return {} if self.trainable else {'text': self._frozen['params']}

    def params(self, params: Any, frozen: dict) -> Any:
        """The encoder's params: trained ones from the stage's params, else the frozen ones."""
        return params['text'] if self.trainable else frozen['text']

    def encode(self, params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array | MaskedStates:
        """[B, L] tokens -> [B, L, width] states (the configured hidden state); T5's with their mask."""
        out = self.module.apply({'params': params}, tokens, mask)
        if self.masked:
            return MaskedStates(out, mask.astype(bool))
        states = out['last_hidden_state'] if self.config.hidden_state == 'last' else out['hidden_states'][-1]
        if self.pooled:
            return PooledStates(states, out.get('text_embeds', out['pooler_output'])[:, None])
        return states

    def _dropped(self, rng: jax.Array, batch: int) -> jax.Array:
        """[B, 1] bool: which captions become the empty caption, with probability text.dropout, for
        the whole batch (the official Würstchen scripts) or per sample (Stable Cascade)."""
        shape = (1,) if self.config.dropout_mode == 'batch' else (batch,)
        return jnp.broadcast_to(jax.random.uniform(rng, shape)[:, None] < self.config.dropout, (batch, 1))

    def drop(self, rng: jax.Array, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Caption dropout for CFG on tokens."""
        drop = self._dropped(rng, tokens.shape[0])
        return (
            jnp.where(drop, jnp.asarray(self.empty_tokens), tokens),
            jnp.where(drop, jnp.asarray(self.empty_mask), mask),
        )

    def drop_states(self, rng: jax.Array, states: Any, empty: Any) -> Any:
        """Caption dropout for CFG on precomputed [B, L, D] states (with their mask) of a frozen encoder:
        a dropped caption's become `empty`, the empty caption's [1, L, D] states."""
        drop = self._dropped(rng, batch_size(states))
        return jax.tree.map(lambda e, s: jnp.where(drop.reshape(drop.shape + (1,) * (s.ndim - 2)), e, s), empty, states)

    def empty_states(self, text_params: Any) -> jax.Array | MaskedStates:
        """[1, L, D] states of the empty caption: what dropped captions and the unconditional half see."""
        return self.encode(text_params, jnp.asarray(self.empty_tokens)[None], jnp.asarray(self.empty_mask)[None])

    def unconditional(self, text_params: Any, cond: Any) -> Any:
        """The empty caption's states, one per caption of `cond`: the unconditional half of guidance."""
        return broadcast_to_captions(self.empty_states(text_params), cond)

    def encode_for_guidance(
        self,
        params: Any,
        frozen: dict,
        tokens: jax.Array,
        mask: jax.Array,
        negative: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[Any, Any]:
        """(states of the captions, states of the unconditional caption): the two halves of guidance.
        The unconditional caption is the empty one, or `negative` (tokens, mask) [1, L]: a negative prompt."""
        text_params = self.params(params, frozen)
        cond = self.encode(text_params, tokens, mask)
        if negative is None:
            return cond, self.unconditional(text_params, cond)
        return cond, broadcast_to_captions(self.encode(text_params, *negative), cond)


def batch_size(cond: Any) -> int:
    """The number of captions in text conditioning (states, or `MaskedStates`)."""
    return jax.tree.leaves(cond)[0].shape[0]


def broadcast_to_captions(empty: Any, cond: Any) -> Any:
    """One caption's [1, L, D] states (or MaskedStates), repeated for each caption of `cond`."""
    return jax.tree.map(lambda e, c: jnp.broadcast_to(e, c.shape), empty, cond)


def concat_halves(cond: Any, uncond: Any) -> Any:
    """[conditional; unconditional] text conditioning, for one doubled call of a guided denoiser."""
    return jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)


# The families whose runs hold a Stage B (and the effnet it trained): Würstchen v2's and v1's.
STAGE_B_FAMILIES = ('stage_b', 'stage_b_tokens')


def trained_run(
    source: str, family: str | tuple[str, ...], step: int | None = None
) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """(saved config, EMA params, model_state) of a trained run of `family` in workdir `source` at
    `step` (the newest checkpoint by default), on one device whatever topology saved it; the optimizer
    state and the training params are not read."""
    config, state = checkpoint.load_trained(source, step, parts=('ema_params', 'model_state'))
    if config.get('input') and config.input.get('precomputed'):  # sampling encodes prompts, reads no records
        config.input.precomputed = ''
    families = (family,) if isinstance(family, str) else family
    if config.model_family not in families:
        raise ConfigError('source', source, f'a workdir of a {" or ".join(families)} run, not {config.model_family}')
    return config, state['ema_params'], state['model_state']


def load_stage_a(stage_a: ml_collections.ConfigDict) -> tuple[VQGAN, dict]:
    """(VQGAN, frozen variables) from `stage_a.source`, a Stage A workdir or a converted vqgan folder/file,
    dividing its latents by `stage_a.scale_factor` where that is set."""
    source = stage_a.source
    if os.path.isdir(os.path.join(source, 'checkpoints')):
        config, params, model_state = trained_run(source, 'stage_a')
        vqgan = VQGAN(**config.model.to_dict(), dtype=DTYPES[config.dtype])
        variables = network_variables(params, model_state, 'vqgan')
    elif os.path.exists(source):
        vqgan, variables = convert.load_diffusers(source, 'vqgan')
    else:
        raise ConfigError('stage_a.source', source, 'a Stage A workdir, a vqgan model folder or checkpoint file')
    if stage_a.scale_factor:
        vqgan = vqgan.clone(scale_factor=stage_a.scale_factor)
    return vqgan, variables


def validate_stage_a(stage_a: ml_collections.ConfigDict) -> None:
    """A frozen Stage A's source exists and its latents' divisor is 0 (the VQGAN's own) or positive."""
    if not os.path.exists(stage_a.source):
        raise ConfigError('stage_a.source', stage_a.source, 'a Stage A workdir, a vqgan model folder or checkpoint')
    if not (isinstance(stage_a.scale_factor, (int, float)) and stage_a.scale_factor >= 0):
        raise ConfigError(
            'stage_a.scale_factor',
            stage_a.scale_factor,
            "0 (the VQGAN's own) or a positive divisor of its latents, e.g. the latent_std of its evaluation",
        )


def stage_a_latents(vqgan: VQGAN, variables: dict, images: jax.Array) -> jax.Array:
    """The space Stage B (and a single-stage prior) diffuses: the Stage A encoder's h / scale_factor."""
    return vqgan.apply(variables, images, method=VQGAN.encode) / vqgan.scale_factor


def stage_a_decode(vqgan: VQGAN, variables: dict, latents: jax.Array) -> jax.Array:
    """Images in [-1, 1] from latents of that space."""
    return vqgan.apply(variables, latents * vqgan.scale_factor, method=VQGAN.decode)


def stage_a_tokens(vqgan: VQGAN, variables: dict, images: jax.Array) -> jax.Array:
    """Stage A's codebook indices [B, H/f, W/f] of images: what Würstchen v1's Stage B predicts."""
    return vqgan.apply(variables, vqgan.apply(variables, images, method=VQGAN.encode), method=VQGAN.quantize)[1]


def stage_a_decode_tokens(vqgan: VQGAN, variables: dict, tokens: jax.Array) -> jax.Array:
    """Images in [-1, 1] from codebook indices [B, h, w]: their codes, decoded."""
    codes = jnp.take(variables['params']['quantizer']['codebook'], tokens, axis=0)
    return vqgan.apply(variables, codes, method=VQGAN.decode)


LATENT_SCALINGS = ('v2', 'none')


def scale_latents(z: jax.Array, scaling: str) -> jax.Array:
    """The effnet's raw map -> the space a prior diffuses (Würstchen's (x + 1)/42 for 'v2'), and
    Würstchen v1's Stage B reads."""
    return (z + 1.0) / 42.0 if scaling == 'v2' else z


def unscale_latents(x: jax.Array, scaling: str) -> jax.Array:
    """Stage C output -> the effnet's raw space that Stage B conditions on (·42 − 1 for v2)."""
    return x * 42.0 - 1.0 if scaling == 'v2' else x


def network_variables(params: Any, model_state: Any, name: str) -> dict:
    """Flax variables of sub-network `name` from a task's params and model_state."""
    return {'params': params[name], **(model_state.get(name) or {})}


def captioned_batch_spec(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Per-example shapes of a batch of images with tokenized captions."""
    size, length = config.input.image_size, config.text.max_length
    return {
        'image': ((size, size, 3), jnp.float32),
        'tokens': ((length,), jnp.int32),
        'token_mask': ((length,), jnp.int32),
    }


def evaluate_held_out(losses_fn, params: Any, model_state: Any, frozen: dict, batches, keys) -> dict[str, float]:
    """Mean over held-out batches (their entries `keys`) of `losses_fn(params, model_state, frozen, batch)`,
    the unweighted ε-MSE at each of diffusion_loss.EVAL_TIMES: a deterministic loss to compare checkpoints by."""
    losses = np.mean(
        [
            sharding.to_host(losses_fn(params, model_state, frozen, {k: jnp.asarray(b[k]) for k in keys}))
            for b in batches
        ],
        axis=0,
    )
    result = {f'loss_t{t}': float(v) for t, v in zip(diffusion_loss.EVAL_TIMES, losses)}
    result['loss'] = float(np.mean(losses))
    return result


def validate_diffusion(config: ml_collections.ConfigDict, text_architectures: tuple[str, ...] = ('clip',)) -> None:
    """The fields Stage B and Stage C share: diffusion, text (of `text_architectures`) and optimizer."""
    validate_text(config.text, text_architectures)
    validate_optimizer(config, 'optimizer')
    d = config.diffusion
    if d.t_sampling not in schedule.T_SAMPLING:
        raise ConfigError('diffusion.t_sampling', d.t_sampling, f'one of {schedule.T_SAMPLING}')
    if d.loss_weight not in schedule.LOSS_WEIGHTS:
        raise ConfigError('diffusion.loss_weight', d.loss_weight, f'one of {schedule.LOSS_WEIGHTS}')
    if not d.p2_k > 0:
        raise ConfigError('diffusion.p2_k', d.p2_k, "a positive number (1 is Würstchen's P2 weight)")
    if d.prediction not in schedule.PREDICTIONS:
        raise ConfigError('diffusion.prediction', d.prediction, f'one of {schedule.PREDICTIONS}')
    if d.sampler not in samplers.SAMPLERS:
        raise ConfigError('diffusion.sampler', d.sampler, f'one of {samplers.SAMPLERS}')


def validate_stage_b(config: ml_collections.ConfigDict, per_level: tuple[str, ...]) -> None:
    """What both Stage B families' configs share: UNet levels (`per_level` fields have an entry each),
    heads, remat, an image size the levels divide, Stage A's source and the effnet."""
    m = config.model
    if len({len(m[f]) for f in per_level}) != 1:
        raise ConfigError('model.c_hidden', m.c_hidden, f'one entry per level, as {", ".join(per_level[1:])} have')
    for kinds, heads, width in zip(m.level_config, m.nhead, m.c_hidden):
        if 'A' in kinds and (heads <= 0 or width % heads):
            raise ConfigError('model.nhead', m.nhead, 'a positive divisor of c_hidden at every level with attention')
    if m.remat_policy not in REMAT_POLICIES:
        raise ConfigError('model.remat_policy', m.remat_policy, f'one of {sorted(REMAT_POLICIES)}')
    unit = 4 * m.patch_size * 2 ** (len(m.c_hidden) - 1)  # the f4 Stage A, then the decoder's levels
    if config.input.image_size % unit:
        raise ConfigError(
            'input.image_size',
            config.input.image_size,
            f'a multiple of {unit} (Stage A f4 x patch size x 2**(levels - 1))',
        )
    validate_stage_a(config.stage_a)
    validate_effnet(config.effnet)


def validate_effnet(effnet: ml_collections.ConfigDict) -> None:
    """A Stage B's `effnet` section: where it comes from, and what it is when trained here."""
    if effnet.source != 'train' and not os.path.exists(effnet.source):
        raise ConfigError(
            'effnet.source',
            effnet.source,
            "'train' (joint training), an effnet folder / checkpoint file, or a Stage B workdir",
        )
    if effnet.source == 'train' and not effnet.stages and effnet.arch not in EFFNET_ARCHS:
        raise ConfigError('effnet.arch', effnet.arch, f'one of {sorted(EFFNET_ARCHS)}, or list effnet.stages')


def effnet_module(effnet: ml_collections.ConfigDict, dtype: Any) -> EfficientNetEncoder:
    """The semantic compressor a Stage B config's `effnet` section describes: torchvision's `arch`, or
    the `stages` it lists."""
    stages = tuple(tuple(s) for s in effnet.stages) if effnet.stages else EFFNET_ARCHS[effnet.arch]
    return EfficientNetEncoder(
        stages=stages,
        last_channels=effnet.last_channels,
        c_latent=effnet.c_latent,
        stochastic_depth_prob=effnet.stochastic_depth,
        dtype=dtype,
    )


class SemanticCompressor:
    """A Stage B's EfficientNet encoder, trained jointly (`effnet.source='train'`, Würstchen v1's
    recipe) or frozen from a folder, a file, or another Stage B run that trained one. Under `jit` its
    BatchNorm statistics are taken over the whole (sharded) batch, as torch's SyncBatchNorm does across
    processes."""

    def __init__(self, effnet: ml_collections.ConfigDict, dtype: Any):
        self.config = effnet
        self.trainable = effnet.source == 'train'
        if self.trainable:
            self.module, self._frozen = effnet_module(effnet, dtype), None
        else:
            self.module, self._frozen = load_effnet(effnet.source, dtype)

    @property
    def channels(self) -> int:
        return self.module.c_latent

    def init(self, rng: jax.Array) -> tuple[dict, dict]:
        """({'effnet': params}, {'effnet': batch_stats}) when trained jointly, else ({}, {})."""
        if not self.trainable:
            return {}, {}
        size = self.config.image_size
        variables = self.module.init(rng, jnp.zeros((1, size, size, 3)))
        return {'effnet': variables['params']}, {'effnet': {'batch_stats': variables['batch_stats']}}

    def frozen_params(self) -> dict:
        return {} if self.trainable else {'effnet': self._frozen}

    def variables(self, params: Any, model_state: Any, frozen: dict) -> dict:
        return network_variables(params, model_state, 'effnet') if self.trainable else frozen['effnet']

    def map_shape(self, variables: dict) -> tuple[int, ...]:
        """[h, w, c] of the map of an image at effnet.image_size."""
        size = self.config.image_size
        return jax.eval_shape(lambda v: self.module.apply(v, jnp.zeros((1, size, size, 3))), variables).shape[1:]

    def map(
        self, variables: dict, images: jax.Array, factor: float = 1.0, train: bool = False, rng: jax.Array | None = None
    ) -> tuple[jax.Array, Any]:
        """(raw map [B, h, w, c] of images in [-1, 1] seen at `factor` x effnet.image_size, resized back to
        the map size of factor 1; the updated BatchNorm statistics when training it, else None)."""
        size = self.config.image_size
        seen = max(32, int(size * factor) // 32 * 32) if factor < 1 else size  # SC: multiples of 32
        x = (images.astype(jnp.float32) + 1) / 2
        if x.shape[1:3] != (seen, seen):
            x = jax.image.resize(x, (x.shape[0], seen, seen, 3), 'bilinear', antialias=True)
        if train and self.trainable:
            out, updates = self.module.apply(variables, x, train=True, mutable=['batch_stats'], rngs={'dropout': rng})
        else:
            out, updates = self.module.apply(variables, x), None
        if seen != size:
            out = resize(out, self.map_shape(variables)[:2], 'bicubic_antialias')
        return out.astype(jnp.float32), updates


def load_effnet(source: str, dtype: Any = jnp.float32) -> tuple[Any, dict]:
    """(effnet module, its frozen variables) from a Stage B workdir that trained it, or a weights
    folder/file that `wurst_jax.convert` reads."""
    if os.path.isdir(os.path.join(source, 'checkpoints')):
        config, params, model_state = trained_run(source, STAGE_B_FAMILIES)
        return effnet_module(config.effnet, DTYPES[config.dtype]), network_variables(params, model_state, 'effnet')
    if not os.path.exists(source):
        raise ConfigError('effnet.source', source, 'a Stage B workdir, an effnet model folder or checkpoint file')
    return convert.load_diffusers(source, 'effnet', dtype=dtype)


def effnet_latents(effnet: Any, variables: dict, images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Images in [-1, 1] -> the effnet's map of them resized to size (h, w) (effnet input in [0, 1])."""
    x = (images.astype(jnp.float32) + 1) / 2
    if x.shape[1:3] != tuple(size):
        x = jax.image.resize(x, (x.shape[0], *size, 3), 'bilinear', antialias=True)
    return effnet.apply(variables, x).astype(jnp.float32)


class CaptionedTask:
    """Where every text-conditional family starts: its config, the text encoder and tokenizer at the
    config's dtype, batches of captioned images, and AdamW over its params."""

    def __init__(self, config: ml_collections.ConfigDict, load_text_weights: bool = True, pooled_text: bool = False):
        self.config = config
        self.dtype = DTYPES[config.dtype]
        self.text = TextConditioner(config.text, self.dtype, load_text_weights, pooled_text)
        self.tokenizer = self.text.tokenizer

    def batch_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        return captioned_batch_spec(self.config)

    def optimizer(self) -> optax.GradientTransformation:
        return optim.adamw(self.config.optimizer, self.config.total_steps)


class DecoderTask(CaptionedTask):
    """What both Stage B families (Würstchen v2's diffusion decoder, v1's Paella) share: a frozen Stage A,
    the semantic compressor (trained jointly or frozen), the text encoder, a decoder UNet configured by
    the same `model` fields, and guided sampling that ends in Stage A's decoder. A family sets
    `self.decoder` and defines `decoder_input(image_hw=None)` (one example of what it denoises, for
    images of image_hw), `decoder_map`, `prediction`, `sample_loop` and `decode_latents`."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.vqgan, self._vqgan_variables = load_stage_a(config.stage_a)
        self.effnet = SemanticCompressor(config.effnet, self.dtype)

    def unet_fields(self) -> dict[str, Any]:
        """The decoder's constructor arguments both UNets (`WuerstchenDiffNeXt`, `Paella`) take alike."""
        m = self.config.model
        per_level = {f: tuple(m[f]) for f in ('c_hidden', 'nhead', 'blocks', 'level_config')}
        shared = {f: m[f] for f in ('c_r', 'patch_size', 'c_cond', 'kernel_size', 'dropout', 'remat_policy')}
        return dict(**per_level, **shared, effnet_embd=self.effnet.channels, dtype=self.dtype)

    def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> tuple[Any, Any]:
        del batch  # shapes come from the config
        dec_rng, eff_rng, text_rng = jax.random.split(rng, 3)
        params, state = self.effnet.init(eff_rng)
        effnet_shape = self.effnet.map_shape(self.effnet.variables(params, state, self.effnet.frozen_params()))
        text = jnp.zeros((1, self.config.text.max_length, self.text.width))
        params['decoder'] = self.decoder.init(
            dec_rng, self.decoder_input(), jnp.zeros((1,)), jnp.zeros((1, *effnet_shape)), text
        )['params']
        if self.text.trainable:
            params['text'] = self.text.init(text_rng)
        return params, state

    def pretrained_params(self) -> dict[str, Any]:
        """{}: a Stage B family starts from scratch unless it overrides this (v2's `init.decoder`)."""
        return {}

    def frozen_params(self) -> dict[str, Any]:
        return {'stage_a': self._vqgan_variables, **self.effnet.frozen_params(), **self.text.frozen_params()}

    def sample(
        self, params: Any, frozen: dict, effnet: jax.Array, tokens: jax.Array, mask: jax.Array, rng: jax.Array, **kwargs
    ) -> jax.Array:
        """Images [B, H, W, 3] in [-1, 1] from raw effnet maps [B, h, w, c] and captions: Stage A decodes
        `sample_latents` (whose keyword arguments pass through)."""
        latents = self.sample_latents(params, frozen, effnet, tokens, mask, rng, **kwargs)
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
        negative: tuple[jax.Array, jax.Array] | None = None,
        image_hw: tuple[int, int] | None = None,
        **options,
    ) -> jax.Array:
        """What Stage A decodes into images of image_hw (a square input.image_size by default), sampled
        from raw effnet maps [B, h, w, c] and captions by the family's `sample_loop` (`options` are its
        own, e.g. v1's temperature); the unconditional half of guidance sees a zero map and the empty
        caption, or `negative` (tokens, mask) [1, L]."""
        s = self.config.sample
        cond, uncond = self.text.encode_for_guidance(params, frozen, tokens, mask, negative)
        effnet = self.decoder_map(effnet)
        halves = jnp.concatenate([effnet, jnp.zeros_like(effnet)]), jnp.concatenate([cond, uncond])

        def predict(x, t, conditional):
            return self.prediction(params, x, t, *((effnet, cond) if conditional else halves))

        guidance = s.decoder_guidance if guidance is None else guidance
        shape = (tokens.shape[0], *self.decoder_input(image_hw).shape[1:])
        return self.sample_loop(predict, rng, shape, steps or s.decoder_steps, guidance, **options)

    def visualize(self, params: Any, model_state: Any, frozen: dict, batch: dict[str, jax.Array]) -> jax.Array:
        """Each image beside Stage B's sample from its effnet map and caption, decoded by Stage A."""
        effnet, _ = self.effnet.map(self.effnet.variables(params, model_state, frozen), batch['image'])
        fake = self.sample(params, frozen, effnet, batch['tokens'], batch['token_mask'], jax.random.key(0))
        return jnp.concatenate([batch['image'], fake], axis=2)
