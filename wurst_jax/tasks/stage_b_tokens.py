"""Würstchen v1's Stage B: Paella predicts Stage A's codebook indices from re-noised ones.

The recipe of dome272/Wuerstchen `train_stage_B.py` and `modules.py` (`Paella.add_noise`,
`Paella.get_loss_weight`, `Wrapper`, `sample`):
- targets are the indices of a frozen Stage A's quantised latents; each is replaced by a uniformly
  random index with probability t, t = clamp((1 − U)·1.08 + 0.001, 0.001, 1);
- the loss is cross-entropy with label smoothing 0.1, weighted per token by
  w = 1 − (1 − mask)·(1 − t)·0.7 and normalised by Σw per sample;
- the semantic compressor (trained jointly, as v1 did, or frozen) gives Paella its map in
  Würstchen's (x + 1)/42 space; for a whole batch it is zeroed with probability 0.05, else noised
  with probability 0.3 by the diffusion forward process at t ~ U(0, 0.5) per sample;
- sampling starts from uniformly random indices and walks t from 1 to 0, re-noising each step's draw
  to the next t with the starting indices, under logit guidance and a falling temperature.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from wurst_jax import sharding
from wurst_jax.config_lib import ConfigError, validate_optimizer
from wurst_jax.diffusion import loss as diffusion_loss
from wurst_jax.diffusion import schedule
from wurst_jax.models.paella import Paella
from wurst_jax.tasks import conditioning
from wurst_jax.tasks.base import Batch, HostBatches, Metrics, Networks

SAMPLING_MODES = ('multinomial', 'argmax')


def add_token_noise(
    rng: jax.Array, tokens: jax.Array, t: jax.Array, num_labels: int, random_tokens: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(tokens [B, H, W] with each replaced with probability t [B] by a random one, the int mask of
    replaced places). `random_tokens` are the replacements (uniform over num_labels when None)."""
    mask_rng, label_rng = jax.random.split(rng)
    mask = (jax.random.uniform(mask_rng, tokens.shape) <= t[:, None, None]).astype(jnp.int32)
    if random_tokens is None:
        random_tokens = jax.random.randint(label_rng, tokens.shape, 0, num_labels)
    return tokens * (1 - mask) + random_tokens * mask, mask


def token_loss_weight(t: jax.Array, mask: jax.Array, min_weight: float = 0.3) -> jax.Array:
    """Per-token weight [B, H, W]: 1 where re-noised, 1 − (1 − t)(1 − min_weight) where kept."""
    return 1 - (1 - mask) * ((1 - t) * (1 - min_weight))[:, None, None]


def token_loss(logits: jax.Array, targets: jax.Array, weight: jax.Array, label_smoothing: float) -> jax.Array:
    """Batch mean of each sample's Σ w·CE / Σ w; CE against the targets smoothed as torch's `label_smoothing`."""
    labels = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), label_smoothing)
    ce = optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)
    return jnp.mean(jnp.sum(ce * weight, axis=(1, 2)) / jnp.sum(weight, axis=(1, 2)))


def sample_tokens(
    logits_fn,
    rng: jax.Array,
    shape: tuple[int, int, int],
    num_labels: int,
    steps: int,
    guidance: float,
    temperature: tuple[float, float],
    mode: str = 'multinomial',
) -> jax.Array:
    """Würstchen v1's token sampler in one `lax.scan`. `logits_fn(tokens, t, conditional)` gives logits
    [B, H, W, K] (conditional=False: the conditional and unconditional halves of a doubled batch)."""
    init_rng, rng = jax.random.split(rng)
    init = jax.random.randint(init_rng, shape, 0, num_labels)
    times = jnp.linspace(1.0, 0.0, steps + 1)
    temperatures = jnp.linspace(temperature[0], temperature[1], steps)

    def step(tokens, xs):
        i, t, t_next, tau, key = xs
        t_b = jnp.full((shape[0],), t)
        if guidance == 1.0:
            logits = logits_fn(tokens, t_b, True)
        else:
            cond, uncond = jnp.split(
                logits_fn(jnp.concatenate([tokens, tokens]), jnp.concatenate([t_b, t_b]), False), 2
            )
            logits = cond * guidance + uncond * (1 - guidance)
        draw_key, noise_key = jax.random.split(key)
        if mode == 'argmax':
            drawn = jnp.argmax(logits, axis=-1)
        else:
            drawn = jax.random.categorical(draw_key, logits.astype(jnp.float32) / tau, axis=-1)
        renoised, _ = add_token_noise(noise_key, drawn, jnp.full((shape[0],), t_next), num_labels, init)
        return jnp.where(i < steps - 1, renoised, drawn).astype(jnp.int32), None

    xs = (jnp.arange(steps), times[:-1], times[1:], temperatures, jax.random.split(rng, steps))
    return jax.lax.scan(step, init, xs)[0]


class TokenStageBTask(conditioning.DecoderTask):
    """Würstchen v1's Paella (+ a jointly trained effnet) on Stage A's codebook indices."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        m = config.model
        if m.num_labels != self.vqgan.num_codes:
            raise ConfigError(
                'model.num_labels',
                m.num_labels,
                f'the codebook size of Stage A ({config.stage_a.source}): {self.vqgan.num_codes}',
            )
        self.decoder = Paella(
            c_in=m.c_in,
            c_out=m.c_in,
            num_labels=m.num_labels,
            byt5_embd=self.text.width,
            self_attn=m.self_attn,
            scan_blocks=m.scan_blocks,
            **self.unet_fields(),
        )
        self._eval_metrics = jax.jit(self._held_out_metrics)

    @staticmethod
    def validate(config: ml_collections.ConfigDict) -> None:
        e, s = config.effnet, config.sample
        conditioning.validate_stage_b(config, ('c_hidden', 'nhead', 'blocks', 'level_config'))
        for field in ('dropout', 'noise'):
            if not 0 <= e[field] < 1:
                raise ConfigError(f'effnet.{field}', e[field], 'a probability in [0, 1)')
        if not 0 <= e.noise_t_max <= 1:
            raise ConfigError('effnet.noise_t_max', e.noise_t_max, 'a time in [0, 1]')
        if not 0 <= config.loss.label_smoothing < 1:
            raise ConfigError('loss.label_smoothing', config.loss.label_smoothing, 'a value in [0, 1)')
        if not 0 < config.loss.min_weight <= 1:
            raise ConfigError('loss.min_weight', config.loss.min_weight, 'a weight in (0, 1]')
        if config.diffusion.t_sampling not in schedule.T_SAMPLING:
            raise ConfigError('diffusion.t_sampling', config.diffusion.t_sampling, f'one of {schedule.T_SAMPLING}')
        if len(s.decoder_temperature) != 2 or min(s.decoder_temperature) <= 0:
            raise ConfigError(
                'sample.decoder_temperature', s.decoder_temperature, 'two positive temperatures, [start, end]'
            )
        if s.decoder_mode not in SAMPLING_MODES:
            raise ConfigError('sample.decoder_mode', s.decoder_mode, f'one of {SAMPLING_MODES}')
        conditioning.validate_text(config.text)
        validate_optimizer(config, 'optimizer')

    # -- state -----------------------------------------------------------------------------------

    def decoder_input(self, image_hw: tuple[int, int] | None = None) -> jax.Array:
        size = self.config.input.image_size
        images = jax.ShapeDtypeStruct((1, *(image_hw or (size, size)), 3), jnp.float32)
        return jnp.zeros(jax.eval_shape(self.targets, {'stage_a': self._vqgan_variables}, images).shape, jnp.int32)

    # -- pieces ----------------------------------------------------------------------------------

    def targets(self, frozen: dict, images: jax.Array) -> jax.Array:
        """Stage A's codebook indices [B, H/4, W/4] of images [B, H, W, 3]."""
        return conditioning.stage_a_tokens(self.vqgan, frozen['stage_a'], images)

    def decoder_map(self, raw: jax.Array) -> jax.Array:
        """The effnet's raw map -> what Paella reads: v1's EfficientNetEncoder output, (x + 1)/42."""
        return conditioning.scale_latents(raw, 'v2')

    def logits(
        self,
        params: Any,
        tokens: jax.Array,
        t: jax.Array,
        effnet: jax.Array,
        cond: jax.Array,
        deterministic: bool = True,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Paella's logits [B, H, W, num_labels] for noised tokens at t, a map in its space, text states."""
        return self.decoder.apply(
            {'params': params['decoder']},
            tokens,
            t,
            effnet,
            cond,
            deterministic=deterministic,
            rngs=None if deterministic else {'dropout': rng},
        )

    def _corrupt_map(self, rng: jax.Array, effnet: jax.Array) -> jax.Array:
        """v1's `Wrapper`: for the whole batch, zero the map (p effnet.dropout) or else noise it (p effnet.noise)
        to a time drawn per sample from U(0, effnet.noise_t_max)."""
        e = self.config.effnet
        choice_rng, t_rng, noise_rng = jax.random.split(rng, 3)
        u = jax.random.uniform(choice_rng, (2,))
        noised = schedule.add_noise(
            effnet,
            jax.random.normal(noise_rng, effnet.shape),
            jax.random.uniform(t_rng, (effnet.shape[0],)) * e.noise_t_max,
        )
        return jnp.where(u[0] < e.dropout, jnp.zeros_like(effnet), jnp.where(u[1] < e.noise, noised, effnet))

    # -- training --------------------------------------------------------------------------------

    def grads(
        self, params: Networks, model_state: Networks, frozen: Networks, batch: Batch, rng: jax.Array, step: jax.Array
    ) -> tuple[Networks, Networks, Metrics]:
        del step
        t_rng, noise_rng, drop_rng, map_rng, dropout_rng, sd_rng = jax.random.split(rng, 6)
        images = batch['image']
        targets = jax.lax.stop_gradient(self.targets(frozen, images))
        t = schedule.sample_t(t_rng, targets.shape[0], self.config.diffusion.t_sampling)
        noised, mask = add_token_noise(noise_rng, targets, t, self.config.model.num_labels)
        weight = token_loss_weight(t, mask, self.config.loss.min_weight)
        tokens, token_mask = self.text.drop(drop_rng, batch['tokens'], batch['token_mask'])

        def loss_fn(p):
            raw, bn_updates = self.effnet.map(
                self.effnet.variables(p, model_state, frozen), images, train=True, rng=sd_rng
            )
            effnet = self._corrupt_map(map_rng, self.decoder_map(raw))
            cond = self.text.encode(self.text.params(p, frozen), tokens, token_mask)
            logits = self.logits(p, noised, t, effnet, cond, deterministic=False, rng=dropout_rng)
            loss = token_loss(logits, targets, weight, self.config.loss.label_smoothing)
            return loss, (logits, bn_updates)

        (loss, (logits, bn_updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        new_state = dict(model_state)
        if bn_updates is not None:
            new_state['effnet'] = bn_updates
        accuracy = jnp.mean((jnp.argmax(logits, -1) == targets).astype(jnp.float32))
        return grads, new_state, dict(loss=loss, accuracy=accuracy)

    # -- sampling and evaluation -----------------------------------------------------------------

    def prediction(self, params: Any, x: jax.Array, t: jax.Array, effnet: jax.Array, cond: jax.Array) -> jax.Array:
        """What sampling draws from: Paella's logits."""
        return self.logits(params, x, t, effnet, cond)

    def sample_loop(
        self,
        predict,
        rng: jax.Array,
        shape: tuple[int, int, int],
        steps: int,
        guidance: float,
        temperature: tuple[float, float] | None = None,
    ) -> jax.Array:
        """Stage A indices `shape` [B, H/4, W/4] by v1's token sampler; `predict(tokens, t, conditional)`
        gives the guided logits, `temperature` (start, end) falls linearly (sample.decoder_temperature if None)."""
        s = self.config.sample
        temperature = tuple(temperature or s.decoder_temperature)
        return sample_tokens(
            predict, rng, shape, self.config.model.num_labels, steps, guidance, temperature, s.decoder_mode
        )

    def decode_latents(self, frozen: dict, indices: jax.Array) -> jax.Array:
        return conditioning.stage_a_decode_tokens(self.vqgan, frozen['stage_a'], indices)

    def _held_out_metrics(self, params: Any, model_state: Any, frozen: dict, batch: dict) -> jax.Array:
        """[2, len(EVAL_TIMES)]: the unweighted cross-entropy and the token accuracy at fixed t, fixed noise."""
        targets = self.targets(frozen, batch['image'])
        raw, _ = self.effnet.map(self.effnet.variables(params, model_state, frozen), batch['image'])
        effnet = self.decoder_map(raw)
        cond = self.text.encode(self.text.params(params, frozen), batch['tokens'], batch['token_mask'])
        out = []
        for i, time in enumerate(diffusion_loss.EVAL_TIMES):
            t = jnp.full((targets.shape[0],), time, jnp.float32)
            noised, _ = add_token_noise(
                jax.random.fold_in(jax.random.key(0), i), targets, t, self.config.model.num_labels
            )
            logits = self.logits(params, noised, t, effnet, cond)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
            out.append(jnp.stack([jnp.mean(ce), jnp.mean((jnp.argmax(logits, -1) == targets).astype(jnp.float32))]))
        return jnp.stack(out, axis=1)

    def evaluate(
        self, params: Networks, model_state: Networks, frozen: Networks, batches: HostBatches
    ) -> dict[str, float]:
        """Held-out cross-entropy and token accuracy at fixed re-noising times and noise."""
        keys = self.batch_spec()
        metrics = np.mean(
            [
                sharding.to_host(self._eval_metrics(params, model_state, frozen, {k: jnp.asarray(b[k]) for k in keys}))
                for b in batches
            ],
            axis=0,
        )
        result = {}
        for name, row in zip(('loss', 'accuracy'), metrics):
            result.update({f'{name}_t{t}': float(v) for t, v in zip(diffusion_loss.EVAL_TIMES, row)})
            result[name] = float(np.mean(row))
        return result
