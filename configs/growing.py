"""Greedy growing on the built-in `shapes` dataset (Vasconcelos et al., "Greedy Growing Enables
High-Resolution Pixel-Based Diffusion Models", arXiv:2405.16759), testing the paper's two claims:
a deeper core aligns text better, and growing a pretrained core needs less high-resolution data.

  # Core scaling: 32 px Shallow-UViT cores of 2, 4 and 8 blocks, equal steps, unlimited 32 px data.
  python -m wurst_jax.main --config=configs/growing.py:arm=core,depth=2 --workdir=workdirs/growing/core_d2
  # Growth: the depth-4 core grown to a 64 px UNet; phase 1 (core frozen), then phase 2 (all trained).
  python -m wurst_jax.main --config=configs/growing.py:arm=grow,data=scarce --workdir=workdirs/growing/grow_scarce_p1
  python -m wurst_jax.main --config=configs/growing.py:arm=grow,data=scarce,phase=2 \
      --workdir=workdirs/growing/grow_scarce_p2
  # The same UNet from scratch on the same 64 px data, for the grown model's total FLOPs (core included).
  python -m wurst_jax.main --config=configs/growing.py:arm=scratch,data=scarce --workdir=workdirs/growing/scratch_scarce

`data=scarce` limits the 64 px set to SCARCE_IMAGES captioned images, repeated; `data=ample` gives
20000 (more than any arm's steps x batch), as the cores always have. `root=DIR` says where the runs
read their sources (DIR/core_d4, DIR/grow_{data}_p1; default workdirs/growing). Each run's final
eval.jsonl holds the held-out loss and the shapes alignment of EVAL_PROMPTS fresh captions
(`alignment_*`).

The core is a Shallow-UViT at 32 px (4x4 patches: an 8x8 core grid); the grown and scratch models are
UNets at 64 px with three 2x levels down to the same 8x8 grid around a core of the same shape.
`python bench/growing_flops.py` lowers each arm's train step and prints XLA's FLOPs per step
(`lowering.step_flops`); STEPS holds the budgets chosen to fit the 2-core machine, the scratch one
giving it the grown model's total (core + phase 1 + phase 2). `runlocal` shrinks everything for tests.
Measured results and commands: README.md, "Greedy growing (pixel space)".
"""

import ml_collections

from wurst_jax import config_lib, defaults
from wurst_jax.data import shapes

ARMS = ('core', 'grow', 'scratch')
CORE_DEPTHS = (2, 4, 8)
GROWN_CORE_DEPTH = 4
DATA = {'scarce': 512, 'ample': 20000}  # 64 px training images
CORE_SIZE, FINAL_SIZE = 32, 64
LEVEL_CHANNELS = (64, 32, 16)  # from the 8x8 core outward: 16, 32, 64 px
STEPS = {'core': 600, 'grow_phase1': 100, 'grow_phase2': 150, 'scratch': 548}
EVAL_PROMPTS = 128


def text_config(runlocal: bool) -> ml_collections.ConfigDict:
    """The text encoder over the grammar's words, trained with the stage."""
    return config_lib.word_text_config(
        shapes.caption_vocabulary(), width=32 if runlocal else 64, layers=1 if runlocal else 2
    )


def grow_source(arg: ml_collections.ConfigDict) -> str:
    """The run an arm starts from: phase 1 grows the core, phase 2 continues phase 1; '' for none."""
    if arg.arm != 'grow':
        return ''
    return f'{arg.root}/core_d{GROWN_CORE_DEPTH}' if arg.phase == 1 else f'{arg.root}/grow_{arg.data}_p1'


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, arm='core', depth=0, phase=1, data='', root='workdirs/growing', runlocal=False)
    # depth is the core's (grow and scratch always build on the depth-4 core); data the 64 px set's.
    if arg.arm != 'core' and arg.depth:
        raise config_lib.ConfigError(
            '<arg>.depth',
            arg.depth,
            f'only arm=core takes a depth (arm={arg.arm} grows the depth-{GROWN_CORE_DEPTH} core)',
        )
    if arg.arm == 'core' and arg.data:
        raise config_lib.ConfigError(
            '<arg>.data', arg.data, 'only arm=grow and arm=scratch take data= (cores always see unlimited data)'
        )
    arg.depth = arg.depth or GROWN_CORE_DEPTH
    arg.data = arg.data or 'ample'
    if arg.arm not in ARMS:
        raise config_lib.ConfigError('<arg>.arm', arg.arm, f'one of {ARMS}')
    if arg.data not in DATA:
        raise config_lib.ConfigError('<arg>.data', arg.data, f'one of {sorted(DATA)}')
    if arg.arm == 'core' and arg.depth not in CORE_DEPTHS:
        raise config_lib.ConfigError('<arg>.depth', arg.depth, f'one of {CORE_DEPTHS}')
    config = defaults.pixel()
    config.total_steps = STEPS[f'grow_phase{arg.phase}' if arg.arm == 'grow' else arg.arm]
    size = CORE_SIZE if arg.arm == 'core' else FINAL_SIZE
    config.input = config_lib.input_config('shapes', image_size=size, batch_size=16)
    config.input.shapes.num_train = DATA['ample'] if arg.arm == 'core' else DATA[arg.data]
    config.input.shapes.num_test = 64
    config.model.update(
        depth=arg.depth if arg.arm == 'core' else GROWN_CORE_DEPTH,
        patch_size=CORE_SIZE // 8,
        level_channels=() if arg.arm == 'core' else LEVEL_CHANNELS,
    )
    config.grow.update(from_workdir=grow_source(arg), phase=arg.phase)
    config.text = text_config(arg.runlocal)
    # The resolution shift is relative to 64 px: the final model is noised as Simple Diffusion's base,
    # the 32 px core with logSNR + 2·log 2, since its pixels hold the same objects with 4x fewer samples.
    config.diffusion.schedule_base = 64.0
    config.optimizer.warmup_steps = 50
    config.eval.update(num_examples=64, batch_size=64, grid_columns=2, alignment_prompts=EVAL_PROMPTS)
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
