"""Stage A on the built-in `shapes` dataset: small and CPU-friendly.

  python -m wurst_jax.main --config=configs/shapes.py:stage=a --workdir=workdirs/shapes_a

Expected: reconstruction PSNR >= 30 dB on 256 held-out images (see README for measured figures).
`runlocal` shrinks everything for tests.
"""
import ml_collections

from wurst_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, stage='a', runlocal=False)
    if arg.stage != 'a':
        raise config_lib.ConfigError('<arg>.stage', arg.stage, "'a' (Stages B and C come with their issues)")
    config = config_lib.base_config()
    config.model_family = 'stage_a'
    config.total_steps = 2500
    config.input = config_lib.input_config('shapes', image_size=64, batch_size=32, flip=True)

    config.model = ml_collections.ConfigDict(dict(
        levels=2, embed_dim=64, bottleneck_blocks=2, latent_channels=4, num_codes=1024, scale_factor=0.3764))
    config.disc = ml_collections.ConfigDict(dict(c_hidden=64, depth=3))
    config.loss = ml_collections.ConfigDict(dict(
        mse_weight=1.0, vq_weight=1.0, commit_weight=0.25, adv_weight=0.001, adv_start=2000,
        perceptual_weight=0.0, perceptual_weights=''))
    config.optimizer = config_lib.optimizer_config(1e-3, warmup_steps=100, schedule='cosine')
    config.disc_optimizer = config_lib.optimizer_config(1e-4, schedule='constant')
    config.eval = ml_collections.ConfigDict(dict(
        data='split', num_examples=256, batch_size=64, use_ema=True, num_grid_images=16, grid_columns=4))
    config.log_every_steps = 100
    config.image_every_steps = 500
    config.checkpoint_every_steps = 500

    if arg.runlocal:
        config.total_steps = 6
        config.input.image_size = 16
        config.input.batch_size = 8
        config.input.shapes = ml_collections.ConfigDict(dict(num_train=64, num_test=16, seed=0))
        config.model.embed_dim = 16
        config.model.bottleneck_blocks = 1
        config.model.num_codes = 32
        config.optimizer.warmup_steps = 1
        config.disc = ml_collections.ConfigDict(dict(c_hidden=8, depth=2))
        config.loss.adv_start = 3
        config.eval.num_examples = 16
        config.eval.batch_size = 8
        config.eval.num_grid_images = 4
        config.log_every_steps = 2
        config.image_every_steps = 3
        config.checkpoint_every_steps = 3
    return config
