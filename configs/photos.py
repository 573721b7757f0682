"""Stage A on random crops of the real photographs bundled with scikit-image.

  python -m wurst_jax.main --config=configs/photos.py:stage=a --workdir=workdirs/photos_a

Training crops are 64x64 from the photos resized to a 320 px shorter side; the astronaut photo is
held out and evaluated as its 64 non-overlapping 64x64 tiles (target: PSNR >= 24 dB).
"""
import ml_collections

from wurst_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, stage='a', runlocal=False)
    if arg.stage != 'a':
        raise config_lib.ConfigError('<arg>.stage', arg.stage, "'a' (Stages B and C come with their issues)")
    config = config_lib.base_config()
    config.model_family = 'stage_a'
    config.total_steps = 2000
    config.input = config_lib.input_config('photos', image_size=64, batch_size=32, crop='random', flip=True,
                                           resize=320)

    config.model = ml_collections.ConfigDict(dict(
        levels=2, embed_dim=64, bottleneck_blocks=3, latent_channels=4, num_codes=2048, scale_factor=0.3764))
    config.disc = ml_collections.ConfigDict(dict(c_hidden=64, depth=3))
    config.loss = ml_collections.ConfigDict(dict(
        mse_weight=1.0, vq_weight=1.0, commit_weight=0.25, adv_weight=0.0, adv_start=0,
        perceptual_weight=0.0, perceptual_weights=''))
    config.optimizer = config_lib.optimizer_config(1e-3, warmup_steps=100, schedule='cosine')
    config.disc_optimizer = config_lib.optimizer_config(1e-4, schedule='constant')
    config.eval = ml_collections.ConfigDict(dict(
        data='astronaut_tiles', num_examples=64, batch_size=64, use_ema=True, num_grid_images=16,
        grid_columns=4))
    config.log_every_steps = 100
    config.image_every_steps = 500
    config.checkpoint_every_steps = 500

    if arg.runlocal:
        config.total_steps = 4
        config.input.batch_size = 8
        config.model.embed_dim = 16
        config.model.bottleneck_blocks = 1
        config.model.num_codes = 32
        config.optimizer.warmup_steps = 1
        config.log_every_steps = 2
        config.image_every_steps = 2
        config.checkpoint_every_steps = 2
    return config
