"""Prompts -> images: Stage C samples the semantic map, Stage B the Stage A latents, Stage A decodes
(a single-stage Stage C run, `latents='stage_a'`, samples the Stage A latents itself: no Stage B).

Each denoising loop is a `lax.scan` inside one jitted function; the prompt batch is sharded over
all devices along `data`, the (small, frozen) params are replicated. A prompt's image depends only
on the seed and its position in the list, not on the batch size or device count.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from wurst_jax import checkpoint, sharding, tasks
from wurst_jax.tasks.base import DecoderSampler, PriorSampler
from wurst_jax.visualize import to_uint8


def needs_stage_b(root: str) -> bool:
    """Whether sampling the run root needs DIR/stage_b: not when its Stage C run is single-stage."""
    config = checkpoint.saved_config(f'{root}/stage_c')
    return config is None or config.latents != 'stage_a'


def parse_temperature(value: str) -> tuple[float, float] | None:
    """'START,END' (a token Stage B's sampling temperature) as two positive floats; '' as None."""
    if not value:
        return None
    try:
        start, end = (float(v) for v in value.split(','))
    except ValueError:
        raise ValueError("give two numbers, 'START,END' (e.g. '0.7,0.3')") from None
    if min(start, end) <= 0:
        raise ValueError('temperatures must be positive')
    return start, end


def check_root(root: str) -> None:
    """FileNotFoundError unless run root `root` holds what sampling reads: a trained DIR/stage_c and,
    unless that Stage C run is single-stage, a trained DIR/stage_b (which names its Stage A)."""
    for stage in ('stage_c', 'stage_b'):
        if stage == 'stage_b' and not needs_stage_b(root):
            continue
        if not checkpoint.all_steps(f'{root}/{stage}'):
            raise FileNotFoundError(
                f'{root}/{stage}/checkpoints has no checkpoint: the run root must hold trained stage_b/ and stage_c/ '
                '(stage_c/ alone if single-stage; python -m wurst_jax.demo --workdir=DIR trains them)'
            )


class Pipeline:
    """The three trained stages of a run root (DIR/stage_c and DIR/stage_b, which names its Stage A;
    DIR/stage_b is not read when the Stage C run is single-stage).

    `prior_step` picks a Stage C checkpoint (the newest by default); `devices` defaults to all of
    them, and an evaluation job that splits prompts across processes passes `jax.local_devices()`.
    """

    def __init__(
        self,
        stage_c_workdir: str,
        stage_b_workdir: str | None,
        *,
        prior_step: int | None = None,
        devices: Sequence[jax.Device] | None = None,
    ):
        self.stage_c_workdir = stage_c_workdir
        self.prior_task: PriorSampler
        self.prior_task, prior_params, _ = tasks.load_trained(stage_c_workdir, 'stage_c', prior_step)
        self.single_stage = self.prior_task.space == 'stage_a'
        self.mesh = sharding.create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}, devices)
        replicated = sharding.replicated(self.mesh)
        self.prior_params = jax.device_put(prior_params, replicated)
        self.prior_frozen = jax.device_put(self.prior_task.frozen_params(), replicated)
        self.decoder_task: DecoderSampler | None = None
        self.decoder_params, self.decoder_frozen = {}, {}
        if not self.single_stage:
            self.decoder_task, decoder_params, _ = tasks.load_trained(
                stage_b_workdir, tasks.conditioning.STAGE_B_FAMILIES
            )
            self.decoder_params = jax.device_put(decoder_params, replicated)
            self.decoder_frozen = jax.device_put(self.decoder_task.frozen_params(), replicated)
        self.batch_sharding = NamedSharding(self.mesh, P('data'))

    def load_prior_step(self, step: int) -> None:
        """Swaps in the Stage C EMA params of checkpoint `step` of the same run; the compiled
        sampler is reused, as its params are arguments."""
        _, state = checkpoint.load_trained(self.stage_c_workdir, step, parts=('ema_params',))  # the task is the same
        self.prior_params = jax.device_put(state['ema_params'], sharding.replicated(self.mesh))

    @classmethod
    def from_root(cls, root: str, **kwargs) -> 'Pipeline':
        return cls(f'{root}/stage_c', f'{root}/stage_b', **kwargs)

    @functools.partial(
        jax.jit,
        static_argnums=(0,),
        static_argnames=(
            'prior_steps',
            'decoder_steps',
            'prior_guidance',
            'decoder_guidance',
            'decoder_temperature',
            'prior_sampler',
        ),
    )
    def _generate(
        self,
        prior_params,
        prior_frozen,
        decoder_params,
        decoder_frozen,
        prior_tokens,
        prior_mask,
        decoder_tokens,
        decoder_mask,
        keys,
        *,
        prior_steps,
        decoder_steps,
        prior_guidance,
        decoder_guidance,
        decoder_temperature,
        prior_sampler,
    ):
        # One key per prompt, so the images do not depend on how prompts are batched.
        def one(p_tok, p_mask, d_tok, d_mask, key):
            prior_key, decoder_key = jax.random.split(key)
            effnet = self.prior_task.sample(
                prior_params,
                prior_frozen,
                p_tok[None],
                p_mask[None],
                prior_key,
                steps=prior_steps,
                guidance=prior_guidance,
                sampler=prior_sampler,
            )
            if self.single_stage:  # the prior sampled Stage A latents
                return self.prior_task.decode(prior_frozen, effnet)[0]
            options = {} if decoder_temperature is None else {'temperature': decoder_temperature}
            return self.decoder_task.sample(
                decoder_params,
                decoder_frozen,
                effnet,
                d_tok[None],
                d_mask[None],
                decoder_key,
                steps=decoder_steps,
                guidance=decoder_guidance,
                **options,
            )[0]

        return jax.vmap(one)(prior_tokens, prior_mask, decoder_tokens, decoder_mask, keys)

    def __call__(
        self,
        prompts: Sequence[str],
        *,
        seed: int = 0,
        batch_size: int = 8,
        prior_steps: int | None = None,
        decoder_steps: int | None = None,
        prior_guidance: float | None = None,
        decoder_guidance: float | None = None,
        decoder_temperature: tuple[float, float] | None = None,
        prior_sampler: str | None = None,
        first_index: int = 0,
    ) -> np.ndarray:
        """uint8 images [N, H, W, 3] for the prompts, in order. `first_index` is the position of
        prompts[0] in a longer list that is split across callers: it keeps each image the same.
        `decoder_temperature` (start, end) is a token Stage B's (Würstchen v1) sampling temperature;
        `prior_sampler` one of the prior's `sampler_choices` (None: its config's)."""
        if prior_sampler and prior_sampler not in self.prior_task.sampler_choices:
            raise ValueError(
                f'prior_sampler={prior_sampler!r}: this Stage C samples with one of {self.prior_task.sampler_choices}'
            )
        if decoder_temperature is not None and 'decoder_temperature' not in (
            self.decoder_task.config.sample if self.decoder_task else {}
        ):
            raise ValueError(
                f'decoder_temperature={decoder_temperature}: only a token Stage B (model_family '
                "'stage_b_tokens') samples with a temperature; leave it unset for this run"
            )
        c_sample = self.prior_task.config.sample
        b_sample = self.decoder_task.config.sample if self.decoder_task else {}
        options = dict(
            prior_steps=prior_steps or c_sample.prior_steps,
            decoder_steps=decoder_steps or b_sample.get('decoder_steps'),
            prior_guidance=c_sample.prior_guidance if prior_guidance is None else prior_guidance,
            decoder_guidance=b_sample.get('decoder_guidance') if decoder_guidance is None else decoder_guidance,
            decoder_temperature=None if decoder_temperature is None else tuple(decoder_temperature),
            prior_sampler=prior_sampler or None,
        )
        devices = self.mesh.size
        batch_size = -(-batch_size // devices) * devices  # a multiple of the device count
        base = jax.random.key(seed)
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            padded = chunk + [''] * (batch_size - len(chunk))  # static shapes: pad the last batch
            p_enc = self.prior_task.tokenizer(padded)
            d_enc = self.decoder_task.tokenizer(padded) if self.decoder_task else p_enc
            first = first_index + start
            keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(first, first + batch_size))
            put = lambda x: jax.device_put(x, self.batch_sharding)
            with jax.set_mesh(self.mesh):
                images = self._generate(
                    self.prior_params,
                    self.prior_frozen,
                    self.decoder_params,
                    self.decoder_frozen,
                    put(p_enc['input_ids']),
                    put(p_enc['attention_mask']),
                    put(d_enc['input_ids']),
                    put(d_enc['attention_mask']),
                    put(keys),
                    **options,
                )
            out.append(to_uint8(images)[: len(chunk)])
        return np.concatenate(out)
