"""LoRA (Hu et al., arXiv:2106.09685) teaching a Stage C prior a colour word its base never saw, on the
built-in `shapes` dataset.

  python -m wurst_jax.main --config=configs/shapes.py:stage=a,demo --workdir=workdirs/lora_shapes/stage_a
  # The base: PixArt-α's DiT on Stage A latents (single-stage), no scene of the held-out colour.
  python -m wurst_jax.main --config=configs/lora_shapes.py:arm=base --workdir=workdirs/lora_shapes/base
  # Rank-4 adapters on the base's attention, on ONLY_IMAGES scenes that name the colour.
  python -m wurst_jax.main --config=configs/lora_shapes.py:arm=lora --workdir=workdirs/lora_shapes/lora
  # The full fine-tune of the base on the same scenes, for comparison.
  python -m wurst_jax.main --config=configs/lora_shapes.py:arm=full --workdir=workdirs/lora_shapes/full
  python bench/lora_shapes.py --root=workdirs/lora_shapes   # alignment, adapter size, step times

`colour=` picks the held-out word (default magenta); `root=DIR` says where the runs are (DIR/stage_a,
DIR/base; default workdirs/lora_shapes). The base is `configs/shapes.py:stage=c,backbone=pixart,
latents=stage_a,demo,hold_out=COLOUR`: its text encoder has the word in its vocabulary, but the word's
embedding never gets a gradient. The lora and full arms start from the base's EMA params (`lora.base`,
`init.prior`) and train on the scenes of `only=COLOUR` (every caption names the colour; the other
object, if any, takes any colour). `runlocal` shrinks everything for tests.
"""

import importlib.util
import os

import ml_collections

from wurst_jax import config_lib
from wurst_jax.data import shapes

ARMS = ('base', 'lora', 'full')
ONLY_IMAGES = 256  # the small set of scenes naming the colour, repeated
STEPS = {'lora': 400, 'full': 400}
CHECKPOINTS = 4  # per fine-tune: the steps the word needed are read off these
# The adapters' branch starts at zero and is scaled by alpha / rank; the full fine-tune moves every weight
# of the base, so it takes a tenth of that rate (and of the base's own 1e-3).
LR = {'lora': 1e-3, 'full': 1e-4}
LORA = dict(rank=4, alpha=4.0, targets='attention')


def shapes_config(arg: str) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'shapes.py')
    spec = importlib.util.spec_from_file_location('shapes_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, arm='base', colour='magenta', root='workdirs/lora_shapes', runlocal=False)
    if arg.arm not in ARMS:
        raise config_lib.ConfigError('<arg>.arm', arg.arm, f'one of {ARMS}')
    if arg.colour not in shapes.COLOURS:
        raise config_lib.ConfigError('<arg>.colour', arg.colour, f'one of the shapes colours {list(shapes.COLOURS)}')
    data = f'hold_out={arg.colour}' if arg.arm == 'base' else f'only={arg.colour}'
    size = 'runlocal' if arg.runlocal else 'demo'
    config = shapes_config(f'stage=c,backbone=pixart,latents=stage_a,root={arg.root},{data},{size}')
    if arg.arm == 'base':
        return config
    config.input.shapes.num_train = 32 if arg.runlocal else ONLY_IMAGES
    config.total_steps = 4 if arg.runlocal else STEPS[arg.arm]
    config.optimizer.update(lr=LR[arg.arm], warmup_steps=1 if arg.runlocal else 20)
    base = f'{arg.root}/base'
    if arg.arm == 'lora':
        config.lora.update(base=base, **LORA)
    else:
        config.init.prior = base
    every = config.total_steps // (2 if arg.runlocal else CHECKPOINTS)
    config.checkpoint_every_steps = config.image_every_steps = every
    config.keep_checkpoints = CHECKPOINTS
    return config
