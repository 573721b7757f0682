"""What the diffusion families (Stage B, Stage C, the pixel family) share: the text encoder (trained
with the stage, or frozen from a local CLIP folder), caption dropout for classifier-free guidance, the
validation of their diffusion, text and optimizer fields, and frozen networks loaded from another run
or a weights file (Stage A's VQGAN with the latent space it defines, the semantic compressor)."""
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from wurst_jax import checkpoint, convert, sharding
from wurst_jax.config_lib import ConfigError, validate_optimizer
from wurst_jax.diffusion import loss as diffusion_loss
from wurst_jax.diffusion import samplers, schedule
from wurst_jax.models.clip import CLIPTextModel
from wurst_jax.models.effnet import EfficientNetEncoder
from wurst_jax.models.layers import DTYPES
from wurst_jax.models.stage_a import VQGAN
from wurst_jax.tokenizer import create_tokenizer

HIDDEN_STATES = ('last', 'penultimate')  # Würstchen: after the final LN; Stable Cascade: hidden_states[-1]
DROPOUT_MODES = ('batch', 'sample')


def validate_text(text: ml_collections.ConfigDict) -> None:
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
        raise ConfigError('text.encoder', text.encoder, "'train', or a local transformers CLIP text folder "
                                                        '(config.json + model.safetensors)')
    if text.tokenizer not in ('bytes', 'words') and not os.path.isfile(os.path.join(text.tokenizer, 'tokenizer.json')):
        raise ConfigError('text.tokenizer', text.tokenizer, "'bytes', 'words', or a local folder with tokenizer.json")


class TextConditioner:
    """Tokenizer + CLIP text encoder; `trainable` when config.text.encoder == 'train'.

    config.text: tokenizer ('bytes', 'words' of text.vocabulary, or a local CLIP folder), max_length,
    encoder ('train' or a local transformers CLIP text folder, used frozen), encoder_config (the CLIP
    fields of a trained encoder), hidden_state, dropout and dropout_mode (caption -> "" for CFG).
    """

    def __init__(self, text: ml_collections.ConfigDict, dtype: Any = jnp.float32):
        self.config = text
        self.tokenizer = create_tokenizer(text.tokenizer, text.max_length, text.vocabulary)
        self.trainable = text.encoder == 'train'
        if self.trainable:
            self.module = CLIPTextModel(vocab_size=self.tokenizer.vocab_size, max_position_embeddings=text.max_length,
                                        eos_token_id=self.tokenizer.eos_token_id, projection_dim=None, dtype=dtype,
                                        **text.encoder_config.to_dict())
            self._frozen = None
        else:
            self.module, self._frozen = convert.load_diffusers(text.encoder, 'clip_text', dtype=dtype)
        empty = self.tokenizer([''])
        self.empty_tokens, self.empty_mask = empty['input_ids'][0], empty['attention_mask'][0]

    @property
    def width(self) -> int:
        return self.module.hidden_size

    def init(self, rng: jax.Array) -> Any:
        return self.module.init(rng, jnp.zeros((1, self.config.max_length), jnp.int32))['params']

    def frozen_variables(self) -> Any:
        return self._frozen

    def params(self, params: Any, frozen: dict) -> Any:
        """The encoder's params: trained ones from the stage's params, else the frozen ones."""
        return params['text'] if self.trainable else frozen['text']

    def encode(self, params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """[B, L] tokens -> [B, L, width] states (the configured hidden state)."""
        out = self.module.apply({'params': params}, tokens, mask)
        return out['last_hidden_state'] if self.config.hidden_state == 'last' else out['hidden_states'][-1]

    def _dropped(self, rng: jax.Array, batch: int) -> jax.Array:
        """[B, 1] bool: which captions become the empty caption, with probability text.dropout, for
        the whole batch (the official Würstchen scripts) or per sample (Stable Cascade)."""
        shape = (1,) if self.config.dropout_mode == 'batch' else (batch,)
        return jnp.broadcast_to(jax.random.uniform(rng, shape)[:, None] < self.config.dropout, (batch, 1))

    def drop(self, rng: jax.Array, tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Caption dropout for CFG on tokens."""
        drop = self._dropped(rng, tokens.shape[0])
        return (jnp.where(drop, jnp.asarray(self.empty_tokens), tokens),
                jnp.where(drop, jnp.asarray(self.empty_mask), mask))

    def drop_states(self, rng: jax.Array, states: jax.Array, text_params: Any) -> jax.Array:
        """Caption dropout for CFG on precomputed [B, L, D] states of a frozen encoder."""
        return jnp.where(self._dropped(rng, states.shape[0])[:, :, None], self.empty_states(text_params), states)

    def empty_states(self, text_params: Any) -> jax.Array:
        """[1, L, D] states of the empty caption: what dropped captions and the unconditional half see."""
        return self.encode(text_params, jnp.asarray(self.empty_tokens)[None], jnp.asarray(self.empty_mask)[None])

    def encode_for_guidance(self, params: Any, frozen: dict, tokens: jax.Array,
                            mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(states of the captions, states of the empty caption): the two halves of guidance."""
        text_params = self.params(params, frozen)
        cond = self.encode(text_params, tokens, mask)
        return cond, jnp.broadcast_to(self.empty_states(text_params), cond.shape)


def trained_run(source: str, family: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, dict, dict]:
    """(saved config, EMA params, model_state) of a trained run of `family` in workdir `source` at
    `step` (the newest checkpoint by default), on one device whatever topology saved it; the optimizer
    state and the training params are not read."""
    config, state = checkpoint.load_trained(source, step, parts=('ema_params', 'model_state'))
    if config.model_family != family:
        raise ConfigError('source', source, f'a workdir of a {family} run, not {config.model_family}')
    return config, state['ema_params'], state['model_state']


def load_stage_a(source: str) -> tuple[VQGAN, dict]:
    """(VQGAN, frozen variables) from a Stage A workdir or a converted vqgan folder/file."""
    if os.path.isdir(os.path.join(source, 'checkpoints')):
        config, params, model_state = trained_run(source, 'stage_a')
        vqgan = VQGAN(**config.model.to_dict(), dtype=DTYPES[config.dtype])
        return vqgan, network_variables(params, model_state, 'vqgan')
    if not os.path.exists(source):
        raise ConfigError('stage_a.source', source, 'a Stage A workdir, a vqgan model folder or checkpoint file')
    return convert.load_diffusers(source, 'vqgan')


def stage_a_latents(vqgan: VQGAN, variables: dict, images: jax.Array) -> jax.Array:
    """The space Stage B (and a single-stage prior) diffuses: the Stage A encoder's h / scale_factor."""
    return vqgan.apply(variables, images, method=VQGAN.encode) / vqgan.scale_factor


def stage_a_decode(vqgan: VQGAN, variables: dict, latents: jax.Array) -> jax.Array:
    """Images in [-1, 1] from latents of that space."""
    return vqgan.apply(variables, latents * vqgan.scale_factor, method=VQGAN.decode)


def network_variables(params: Any, model_state: Any, name: str) -> dict:
    """Flax variables of sub-network `name` from a task's params and model_state."""
    return {'params': params[name], **(model_state.get(name) or {})}


def captioned_batch_spec(config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Per-example shapes of a batch of images with tokenized captions."""
    size, length = config.input.image_size, config.text.max_length
    return {'image': ((size, size, 3), jnp.float32), 'tokens': ((length,), jnp.int32),
            'token_mask': ((length,), jnp.int32)}


def evaluate_held_out(losses_fn, params: Any, model_state: Any, frozen: dict, batches, keys) -> dict[str, float]:
    """Mean over held-out batches (their entries `keys`) of `losses_fn(params, model_state, frozen, batch)`,
    the unweighted ε-MSE at each of diffusion_loss.EVAL_TIMES: a deterministic loss to compare checkpoints by."""
    losses = np.mean([sharding.to_host(losses_fn(params, model_state, frozen, {k: jnp.asarray(b[k]) for k in keys}))
                      for b in batches], axis=0)
    result = {f'loss_t{t}': float(v) for t, v in zip(diffusion_loss.EVAL_TIMES, losses)}
    result['loss'] = float(np.mean(losses))
    return result


def validate_diffusion(config: ml_collections.ConfigDict) -> None:
    """The fields Stage B and Stage C share: diffusion, text and optimizer."""
    validate_text(config.text)
    validate_optimizer(config, 'optimizer')
    d = config.diffusion
    if d.t_sampling not in schedule.T_SAMPLING:
        raise ConfigError('diffusion.t_sampling', d.t_sampling, f'one of {schedule.T_SAMPLING}')
    if d.loss_weight not in schedule.LOSS_WEIGHTS:
        raise ConfigError('diffusion.loss_weight', d.loss_weight, f'one of {schedule.LOSS_WEIGHTS}')
    if not d.p2_k > 0:
        raise ConfigError('diffusion.p2_k', d.p2_k, 'a positive number (1 is Würstchen\'s P2 weight)')
    if d.prediction not in schedule.PREDICTIONS:
        raise ConfigError('diffusion.prediction', d.prediction, f'one of {schedule.PREDICTIONS}')
    if d.sampler not in samplers.SAMPLERS:
        raise ConfigError('diffusion.sampler', d.sampler, f'one of {samplers.SAMPLERS}')


def effnet_module(effnet: ml_collections.ConfigDict, dtype: Any) -> EfficientNetEncoder:
    """The semantic compressor a Stage B config's `effnet` section describes."""
    return EfficientNetEncoder(stages=tuple(tuple(s) for s in effnet.stages), last_channels=effnet.last_channels,
                               c_latent=effnet.c_latent, stochastic_depth_prob=effnet.stochastic_depth, dtype=dtype)


def load_effnet(source: str, dtype: Any = jnp.float32) -> tuple[Any, dict]:
    """(effnet module, its frozen variables) from a Stage B workdir that trained it, or a weights
    folder/file that `wurst_jax.convert` reads."""
    if os.path.isdir(os.path.join(source, 'checkpoints')):
        config, params, model_state = trained_run(source, 'stage_b')
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
