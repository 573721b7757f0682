"""Greedy growing on the built-in `shapes` dataset: a core trained at 16 px, grown to 64 px, against
the same 64 px UNet trained from scratch with the same training FLOPs (Vasconcelos et al., "Greedy
Growing Enables High-Resolution Pixel-Based Diffusion Models", arXiv:2405.16759).

  python -m wurst_jax.main --config=configs/growing.py:arm=core --workdir=workdirs/growing/core
  python -m wurst_jax.main --config=configs/growing.py:arm=grow --workdir=workdirs/growing/grow  # reads core
  python -m wurst_jax.main --config=configs/growing.py:arm=scratch --workdir=workdirs/growing/scratch

`root=DIR` says where the core run is (DIR/core; default workdirs/growing). `arm=grow,phase=2` trains
the grown model end to end (the core unfrozen). Each run's final eval.jsonl holds the held-out loss
and the shapes alignment of EVAL_PROMPTS fresh captions (`alignment_*`).

The core is a Shallow-UViT at 16 px (2x2 patches: an 8x8 core grid); the grown and scratch models are
UNets at 64 px with three 2x levels down to the same 8x8 grid around a core of the same shape.
Step counts: `python bench/growing_flops.py` lowers each arm's train step and prints XLA's FLOPs per
step (`lowering.step_flops`); STEPS holds the core and grow budgets chosen to fit the 2-core machine and
the scratch budget that gives it the same total. `runlocal` shrinks everything for tests.

Result (2 shared CPU cores, batch 16, EMA params, 200 fresh captions, DDIM 20 steps, guidance 4):

  arm      FLOP/step  steps  total FLOP  wall*   colour  position  shape  all correct  held-out loss
  core     7.906e9    1500   11.86e12    7 m     0.288   0.023     0.010  0.000        0.0173 (16 px)
  grow     1.539e10    400    6.16e12   10 m     0.197   0.039     0.026  0.000        0.0571
  scratch  1.541e10   1170   18.03e12   19 m     0.362   0.097     0.026  0.010        0.0250
  (core + grow = 18.01e12 FLOP, scratch 18.03e12: equal within 0.1 %; * wall clock with start-up,
  compiles and the final eval, sharing the machine with other jobs)

At this budget the 64 px UNet trained from scratch beats the grown one on every figure: 400 frozen-core
steps leave the new full-resolution layers rendering speckled blobs (samples_0000400.png), and the
16 px core's layout (position 0.02 at 16 px, where objects are 4 px) is weak to begin with. The
grown phase-1 step costs as much as a scratch step (XLA still computes the core's weight gradients,
which the optimizer then zeroes).
"""

import ml_collections

from wurst_jax import config_lib, defaults
from wurst_jax.data import shapes

ARMS = ('core', 'grow', 'scratch')
CORE_SIZE, FINAL_SIZE = 16, 64
LEVEL_CHANNELS = (64, 32, 16)  # from the 8x8 core outward: 16, 32, 64 px
STEPS = {'core': 1500, 'grow': 400, 'scratch': 1170}
EVAL_PROMPTS = 200


def text_config(runlocal: bool) -> ml_collections.ConfigDict:
    """The text encoder over the grammar's words, trained with the stage."""
    return config_lib.word_text_config(
        shapes.caption_vocabulary(), width=32 if runlocal else 64, layers=1 if runlocal else 2
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, arm='core', root='workdirs/growing', phase=1, runlocal=False)
    if arg.arm not in ARMS:
        raise config_lib.ConfigError('<arg>.arm', arg.arm, f'one of {ARMS}')
    config = defaults.pixel()
    config.total_steps = STEPS[arg.arm]
    size = CORE_SIZE if arg.arm == 'core' else FINAL_SIZE
    config.input = config_lib.input_config('shapes', image_size=size, batch_size=16)
    config.model.level_channels = () if arg.arm == 'core' else LEVEL_CHANNELS
    config.grow.update(from_workdir=f'{arg.root}/core' if arg.arm == 'grow' else '', phase=arg.phase)
    config.text = text_config(arg.runlocal)
    # The resolution shift is relative to 64 px: the final model is noised as Simple Diffusion's base,
    # the 16 px core with logSNR + 2·log 4, since its pixels hold the same objects with 16x fewer samples.
    config.diffusion.schedule_base = 64.0
    config.optimizer.warmup_steps = 100
    config.eval.update(num_examples=64, batch_size=50, grid_columns=2, alignment_prompts=EVAL_PROMPTS)
    config.input.shapes.num_test = 64
    config.image_every_steps = config.checkpoint_every_steps = 1000
    config.eval_every_steps = 0  # at the end only

    if arg.runlocal:
        config.total_steps = 4
        config.input.image_size = 16 if arg.arm == 'core' else 32
        config.input.batch_size = 8
        config.input.shapes = ml_collections.ConfigDict(dict(num_train=32, num_test=8, seed=0))
        config.model.update(
            c=16, depth=1, num_heads=2, c_r=16, patch_size=2, level_channels=() if arg.arm == 'core' else (16, 8)
        )
        config.sample.steps = 2
        config.optimizer.warmup_steps = 1
        config.eval.update(num_examples=8, batch_size=8, num_grid_images=2, alignment_prompts=8)
        config.log_every_steps = 2
        config.image_every_steps = config.checkpoint_every_steps = 2
    return config
