"""Stage A on random crops of the real photographs bundled with scikit-image.

  python -m wurst_jax.main --config=configs/photos.py:stage=a --workdir=workdirs/photos_a

Training crops are 64x64 from the photos resized to a 320 px shorter side; the astronaut photo is
held out and evaluated as its 64 non-overlapping 64x64 tiles (target: PSNR >= 24 dB).
"""

import ml_collections

from wurst_jax import config_lib, defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, stage='a', runlocal=False)
    if arg.stage != 'a':
        raise config_lib.ConfigError('<arg>.stage', arg.stage, "'a' (Stages B and C come with their issues)")
    config = defaults.stage_a()
    config.total_steps = 2000
    config.input = config_lib.input_config('photos', image_size=64, batch_size=32, crop='random', flip=True, resize=320)
    config.model.update(embed_dim=64, bottleneck_blocks=3, num_codes=2048)
    config.disc.update(c_hidden=64, depth=3)
    config.loss.update(adv_weight=0.0, adv_start=0)
    config.optimizer.update(lr=1e-3, warmup_steps=100)
    config.disc_optimizer.lr = 1e-4
    config.eval.update(data='astronaut_tiles', num_examples=64, batch_size=64, num_grid_images=16)
    config.image_every_steps = config.checkpoint_every_steps = 500
    config.eval_every_steps = 0  # at the end only

    if arg.runlocal:
        config.total_steps = 4
        config.input.batch_size = 8
        config.model.update(embed_dim=16, bottleneck_blocks=1, num_codes=32)
        config.optimizer.warmup_steps = 1
        config.log_every_steps = config.image_every_steps = config.checkpoint_every_steps = 2
    return config
