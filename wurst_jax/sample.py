"""python -m wurst_jax.sample --workdir=DIR --prompts=FILE --out=OUT [--seed=0] [--batch_size=8]
   [--prior_steps=N] [--decoder_steps=N] [--prior_guidance=W] [--decoder_guidance=W] [--decoder_temperature=START,END]
   [--prior_sampler=NAME] [--negative_prompt=TEXT] [--height=H --width=W] [--lora=PATH[:SCALE] ...]

Generates one image per line of FILE with the stages trained under DIR (DIR/stage_c, DIR/stage_b,
and the Stage A that DIR/stage_b names; `python -m wurst_jax.demo` makes such a DIR). Writes
OUT/00000.png, ... in prompt order, OUT/grid.png and OUT/prompts.json.

`--lora` (repeatable) merges a LoRA file, or a folder holding pytorch_lora_weights.safetensors, at SCALE
(1 by default) into the stage its keys name: what `python -m wurst_jax.export` writes from a LoRA run, or
a file trained elsewhere for diffusers' `load_lora_weights`. `--height/--width` take any size the stages
make, non-square included (Würstchen v2's stages work in 128 px steps); another is refused, naming the
nearest one they make.
"""

import json
import os

from absl import app, flags

from wurst_jax import visualize
from wurst_jax.data.prompts import read_prompts

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run root holding stage_b/ and stage_c/.')
_PROMPTS = flags.DEFINE_string('prompts', None, 'Text file, one prompt per line.')
_OUT = flags.DEFINE_string('out', None, 'Output folder.')
_SEED = flags.DEFINE_integer('seed', 0, 'Same seed, same images.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Prompts per device batch (rounded up to the device count).')
_PRIOR_STEPS = flags.DEFINE_integer('prior_steps', None, 'Stage C steps (default: the Stage C config).')
_DECODER_STEPS = flags.DEFINE_integer('decoder_steps', None, 'Stage B steps (default: the Stage B config).')
_PRIOR_GUIDANCE = flags.DEFINE_float('prior_guidance', None, 'Stage C CFG scale (default: config).')
_DECODER_GUIDANCE = flags.DEFINE_float('decoder_guidance', None, 'Stage B CFG scale (default: config).')
_PRIOR_SAMPLER = flags.DEFINE_string(
    'prior_sampler',
    '',
    "Stage C sampler, e.g. ddpm, ddim; with PixArt-α's iDDPM dpm_solver or iddpm (default: config).",
)
_DECODER_TEMPERATURE = flags.DEFINE_string(
    'decoder_temperature',
    '',
    "START,END: a token Stage B's (Würstchen v1) sampling temperature, falling over its steps (default: config).",
)
_NEGATIVE = flags.DEFINE_string(
    'negative_prompt', None, 'What guidance steers away from, in both stages (default: the empty caption).'
)
_HEIGHT = flags.DEFINE_integer('height', None, "Image height in px (default: the stages' trained size).")
_WIDTH = flags.DEFINE_integer('width', None, "Image width in px (default: the stages' trained size).")
_LORA = flags.DEFINE_multi_string('lora', [], 'PATH[:SCALE]: a LoRA file or folder to merge; repeatable.')
flags.mark_flags_as_required(['workdir', 'prompts', 'out'])


def write_images(images, prompts: list[str], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for i, image in enumerate(images):
        visualize.save_png(os.path.join(out, f'{i:05d}.png'), image)
    grid = visualize.image_grid(images.astype('float32') / 127.5 - 1, ncols=min(8, len(images)))
    visualize.save_png(os.path.join(out, 'grid.png'), grid)
    with open(os.path.join(out, 'prompts.json'), 'w') as f:
        json.dump(prompts, f, indent=1)


def main(argv):
    del argv
    prompts = read_prompts(_PROMPTS.value)
    from wurst_jax.pipeline import (
        Pipeline,
        check_root,
        parse_lora,
        parse_temperature,
    )  # after the prompts: JAX loads slowly

    try:
        check_root(_WORKDIR.value)
    except FileNotFoundError as e:
        raise SystemExit(f'--workdir={_WORKDIR.value}: {e}') from None
    try:
        temperature = parse_temperature(_DECODER_TEMPERATURE.value)
    except ValueError as e:
        raise SystemExit(f'--decoder_temperature={_DECODER_TEMPERATURE.value}: {e}') from None
    for name, value in (('height', _HEIGHT.value), ('width', _WIDTH.value)):
        if value is not None and value <= 0:
            raise SystemExit(f'--{name}={value}: give a positive number of pixels')
    try:
        pipeline = Pipeline.from_root(_WORKDIR.value, loras=[parse_lora(v) for v in _LORA.value])
        images = pipeline(
            prompts,
            seed=_SEED.value,
            batch_size=_BATCH.value,
            prior_steps=_PRIOR_STEPS.value,
            decoder_steps=_DECODER_STEPS.value,
            prior_guidance=_PRIOR_GUIDANCE.value,
            decoder_guidance=_DECODER_GUIDANCE.value,
            decoder_temperature=temperature,
            prior_sampler=_PRIOR_SAMPLER.value or None,
            negative_prompt=_NEGATIVE.value,
            height=_HEIGHT.value,
            width=_WIDTH.value,
        )
    except (FileNotFoundError, ValueError) as e:  # a LoRA file, a size or a sampler the run cannot take
        raise SystemExit(str(e)) from None
    write_images(images, prompts, _OUT.value)
    print(f'wrote {len(images)} images and grid.png to {_OUT.value}')


if __name__ == '__main__':
    app.run(main)
