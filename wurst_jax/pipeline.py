"""Prompts -> images: Stage C samples the semantic map, Stage B the Stage A latents, Stage A decodes
(a single-stage Stage C run, `latents='stage_a'`, samples the Stage A latents itself: no Stage B).

Each denoising loop is a `lax.scan` inside one jitted function; the prompt batch is sharded over
all devices along `data`, the (small, frozen) params are replicated. A prompt's image depends only
on the seed and its position in the list, not on the batch size or device count.
"""

import fractions
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from wurst_jax import checkpoint, lora, sharding, tasks
from wurst_jax.convert import lora as lora_format
from wurst_jax.tasks import formats
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


def parse_lora(value: str) -> tuple[str, float]:
    """'PATH[:SCALE]' -> (PATH, SCALE); the scale is 1 where none is given."""
    path, sep, scale = value.rpartition(':')
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass  # a ':' of the path itself
    return value, 1.0


def merge_lora_files(task: Any, params: Any, loras: Sequence[tuple[str, dict, float]]) -> tuple[Any, list[str]]:
    """`params` of a trained task with each LoRA file (path, state dict, scale) holding entries for its
    network merged in at that scale, and the paths that did; a family without a diffusers format takes none."""
    try:
        name, module, component, prefix = formats.diffusers_network(task)
    except ValueError:
        return params, []
    used = []
    for path, state, scale in loras:
        if any(k.startswith(prefix + '.') for k in state):
            try:
                adapters = lora_format.from_diffusers(module, component, params[name], state, prefix)
            except ValueError as e:
                raise ValueError(f'--lora={path}: {e}') from None
            params = {**params, name: lora.merge(params[name], adapters, scale)}
            used.append(path)
    return params, used


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
    `loras` are (LoRA file or folder, scale) pairs in the format `wurst_jax.export` writes and diffusers'
    `load_lora_weights` reads: each is merged into the stage its keys name (prior / transformer, decoder).
    """

    def __init__(
        self,
        stage_c_workdir: str,
        stage_b_workdir: str | None,
        *,
        prior_step: int | None = None,
        devices: Sequence[jax.Device] | None = None,
        loras: Sequence[tuple[str, float]] = (),
    ):
        self.stage_c_workdir = stage_c_workdir
        self.prior_task: PriorSampler
        lora_files = [(path, lora_format.read(path), scale) for path, scale in loras]
        self.prior_task, prior_params, _ = tasks.load_trained(stage_c_workdir, 'stage_c', prior_step)
        prior_params, used = merge_lora_files(self.prior_task, prior_params, lora_files)
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
            decoder_params, used_by_decoder = merge_lora_files(self.decoder_task, decoder_params, lora_files)
            used += used_by_decoder
            self.decoder_params = jax.device_put(decoder_params, replicated)
            self.decoder_frozen = jax.device_put(self.decoder_task.frozen_params(), replicated)
        unused = [path for path, _ in loras if path not in used]
        if unused:
            raise ValueError(
                f'--lora={unused[0]}: its keys name no stage of this run (expected prior., transformer. or '
                'decoder. entries, as wurst_jax.export writes; a token Stage B takes none)'
            )
        self.batch_sharding = NamedSharding(self.mesh, P('data'))
        self._valid_sizes: set[tuple[int, int]] = {(self.image_size, self.image_size)}

    @property
    def image_size(self) -> int:
        """The side of the square images the last stage was trained on: the default size."""
        return (self.decoder_task or self.prior_task).config.input.image_size

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
            'image_hw',
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
        negative,
        *,
        prior_steps,
        decoder_steps,
        prior_guidance,
        decoder_guidance,
        decoder_temperature,
        prior_sampler,
        image_hw,
    ):
        """Images [B, H, W, 3] for captions tokens/mask [B, L], one key each; `negative` is None or the
        negative prompt's ((tokens, mask) for Stage C, for Stage B), each [1, L]."""
        prior_negative, decoder_negative = negative or (None, None)

        # One key per prompt, so the images do not depend on how prompts are batched.
        def one(p_tok, p_mask, d_tok, d_mask, key):
            prior_key, decoder_key = jax.random.split(key)
            effnet = self.prior_task.sample(
                prior_params,
                prior_frozen,
                p_tok[None],
                p_mask[None],
                prior_key,
                negative=prior_negative,
                steps=prior_steps,
                guidance=prior_guidance,
                sampler=prior_sampler,
                image_hw=image_hw,
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
                negative=decoder_negative,
                steps=decoder_steps,
                guidance=decoder_guidance,
                image_hw=image_hw,
                **options,
            )[0]

        return jax.vmap(one)(prior_tokens, prior_mask, decoder_tokens, decoder_mask, keys)

    def _images_hw(self, image_hw: tuple[int, int]) -> tuple[int, int] | None:
        """The size of the images the stages make when asked for image_hw; None where a network cannot
        take the latents of that size (traced with abstract shapes, nothing runs)."""
        tokens = jax.ShapeDtypeStruct((1, self.prior_task.config.text.max_length), jnp.int32)
        d_tokens = (
            tokens
            if self.decoder_task is None
            else jax.ShapeDtypeStruct((1, self.decoder_task.config.text.max_length), jnp.int32)
        )
        keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 1))
        options = dict(
            prior_steps=1,
            decoder_steps=1,
            prior_guidance=1.0,
            decoder_guidance=1.0,
            decoder_temperature=None,
            prior_sampler=None,
            image_hw=image_hw,
        )
        args = (self.prior_params, self.prior_frozen, self.decoder_params, self.decoder_frozen)
        try:
            images = jax.eval_shape(
                lambda *a: self._generate(*a, None, **options), *args, tokens, tokens, d_tokens, d_tokens, keys
            )
        except (TypeError, ValueError):  # e.g. a UNet's skip connection of another size
            return None
        return tuple(images.shape[1:3])

    def _size_step(self) -> int:
        """The pixel multiple every side must be for each stage's latents to have a whole size: the
        lcm of the numerators of image side / latent side at the trained size (Würstchen v2: 1024 / 24,
        so 128 px)."""
        size, steps = self.image_size, []
        latent_sides = [self.prior_task.latent_shape((size, size))[0]]
        if self.decoder_task is not None:
            latent_sides.append(self.decoder_task.decoder_input((size, size)).shape[1])
        for side in latent_sides:
            steps.append(fractions.Fraction(size, side).numerator)
        return math.lcm(*steps)

    def check_size(self, image_hw: tuple[int, int]) -> None:
        """ValueError unless the stages make images of image_hw (height, width), naming the nearest size they do."""
        if image_hw in self._valid_sizes:
            return
        if min(image_hw) > 0 and self._images_hw(image_hw) == image_hw:
            self._valid_sizes.add(image_hw)
            return
        step, default = self._size_step(), self.image_size
        nearest = []
        for axis, side in enumerate(image_hw):
            candidates = sorted(
                {max(step, step * round(side / step) + k * step) for k in range(-3, 4)}, key=lambda c: abs(c - side)
            )
            for candidate in candidates:
                probe = (candidate, default) if axis == 0 else (default, candidate)
                if self._images_hw(probe) == probe:
                    nearest.append(candidate)
                    break
            else:
                nearest.append(None)
        hint = (
            f'the nearest size they make is {nearest[0]}x{nearest[1]}'
            if None not in nearest
            else (f'sides must be multiples of {step} px')
        )
        raise ValueError(
            f'height x width {image_hw[0]}x{image_hw[1]}: these stages cannot make images of that size; {hint} '
            f'(trained at {default}x{default})'
        )

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
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        first_index: int = 0,
    ) -> np.ndarray:
        """uint8 images [N, H, W, 3] for the prompts, in order. `first_index` is the position of
        prompts[0] in a longer list that is split across callers: it keeps each image the same.
        `decoder_temperature` (start, end) is a token Stage B's (Würstchen v1) sampling temperature;
        `prior_sampler` one of the prior's `sampler_choices` (None: its config's). `negative_prompt`
        replaces the empty caption in the unconditional half of both stages' guidance; `height` and
        `width` (the trained size by default) must be a size the stages make (`check_size`)."""
        image_hw = (height or self.image_size, width or self.image_size)
        self.check_size(image_hw)
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
            image_hw=image_hw,
        )
        negative = None
        if negative_prompt is not None:
            p_neg = self.prior_task.tokenizer([negative_prompt])
            d_neg = self.decoder_task.tokenizer([negative_prompt]) if self.decoder_task else p_neg
            negative = tuple(
                (jnp.asarray(enc['input_ids']), jnp.asarray(enc['attention_mask'])) for enc in (p_neg, d_neg)
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
                    negative,
                    **options,
                )
            out.append(to_uint8(images)[: len(chunk)])
        return np.concatenate(out)
