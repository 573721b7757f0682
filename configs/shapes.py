"""The three Würstchen stages on the built-in `shapes` dataset: small and CPU-friendly.

  python -m wurst_jax.main --config=configs/shapes.py:stage=a --workdir=workdirs/shapes/stage_a
  python -m wurst_jax.main --config=configs/shapes.py:stage=b --workdir=workdirs/shapes/stage_b
  python -m wurst_jax.main --config=configs/shapes.py:stage=b,tokens --workdir=workdirs/shapes/stage_b  # Würstchen v1's
  python -m wurst_jax.main --config=configs/shapes.py:stage=c --workdir=workdirs/shapes/stage_c
  python -m wurst_jax.main --config=configs/shapes.py:stage=c,backbone=pixart --workdir=workdirs/shapes/stage_c_pixart
  python -m wurst_jax.main --config=configs/shapes.py:stage=c,backbone=pixart,latents=stage_a --workdir=workdirs/shapes/single
  python -m wurst_jax.main --config=configs/shapes.py:stage=c,backbone=stable_cascade --workdir=workdirs/shapes/stage_c_sc
  python -m wurst_jax.main --config=configs/shapes.py:stage=c,backbone=pixart,latents=stage_a,pixart_recipe --workdir=workdirs/shapes/recipe

`root=DIR` says where the earlier stages' workdirs are (DIR/stage_a, DIR/stage_b; default
workdirs/shapes); `python -m wurst_jax.demo` runs all three with `demo`, the step budgets that fit
the demo's 30 minutes on 2 CPU cores. Stage B trains the semantic
compressor jointly (no ImageNet weights ship offline) and Stage C diffuses its 8x8x16 map of the
64 px image, predicting v with a linear output head (`latents=stage_a`: a single diffusion stage on
Stage A's 16x16x4 latents, no Stage B). Both train their own small CLIP-architecture text encoder over
the grammar's words, so no vocabulary file is needed. Images are never flipped for B and C: the captions say left and right.
`hold_out=COLOUR` draws no scene with that colour (the word is never seen), `only=COLOUR` only scenes
that name it (configs/lora_shapes.py teaches a held-out word with these).
`pixart_recipe` trains PixArt-α's DiT as PixArt-α was trained, at toy size: a small T5 encoder (trained
with the stage, since no T5 weights ship offline), iDDPM's linear-β process with the learned variance
and the hybrid loss, ε-prediction, DPM-Solver++ at 20 steps, on Stage A latents scaled to std 4.3.
`runlocal` shrinks everything for tests.
"""

import ml_collections

from wurst_jax import config_lib, defaults
from wurst_jax.data import shapes

# EfficientNet stages (type, expand ratio, kernel, stride, in, out, layers): with the stride-2 stem,
# a total stride of 8, so 64 px images give an 8x8 map.
# Steps per stage in the demo: measured to fit 30 minutes on the 2-core machine together.
DEMO_STEPS = {'a': 800, 'b': 1300, 'c': 2500}
SHAPES_EFFNET = [('fused', 1, 3, 1, 16, 16, 1), ('fused', 4, 3, 2, 16, 32, 1), ('mb', 4, 3, 2, 32, 48, 1)]


def text_config(runlocal: bool, architecture: str = 'clip') -> ml_collections.ConfigDict:
    """The text encoder over the grammar's words, trained with the stage."""
    return config_lib.word_text_config(
        shapes.caption_vocabulary(),
        width=32 if runlocal else 64,
        layers=1 if runlocal else 2,
        architecture=architecture,
    )


def _stage_a(runlocal: bool) -> ml_collections.ConfigDict:
    config = defaults.stage_a()
    config.total_steps = 2500
    config.input = config_lib.input_config('shapes', image_size=64, batch_size=32, flip=True)
    config.model.update(embed_dim=64, bottleneck_blocks=2, num_codes=1024)
    config.disc.update(c_hidden=64, depth=3)
    config.loss.update(adv_weight=0.001, adv_start=2000)
    config.optimizer.update(lr=1e-3, warmup_steps=100)
    config.disc_optimizer.lr = 1e-4
    config.eval.num_grid_images = 16
    if runlocal:
        config.model.update(embed_dim=16, bottleneck_blocks=1, num_codes=32)
        config.disc.update(c_hidden=8, depth=2)
        config.loss.adv_start = 3
    return config


def _decoder(config: ml_collections.ConfigDict, root: str, runlocal: bool) -> ml_collections.ConfigDict:
    """What both Stage Bs share: the data, Stage A, the jointly trained effnet, the UNet's levels, the text."""
    config.total_steps = 3000
    config.input = config_lib.input_config('shapes', image_size=64, batch_size=32)
    config.stage_a.source = f'{root}/stage_a'
    config.effnet.update(source='train', stages=SHAPES_EFFNET, last_channels=128, stochastic_depth=0.0, image_size=64)
    config.model.update(c_cond=64, c_hidden=[64, 128], blocks=[2, 2], level_config=['CT', 'CTA'], dropout=0.0)
    config.text = text_config(runlocal)
    config.eval.grid_columns = 2
    if runlocal:
        config.effnet.update(stages=[('fused', 1, 3, 1, 8, 8, 1), ('mb', 2, 3, 2, 8, 16, 1)], last_channels=32)
        config.effnet.c_latent = 4
        config.model.update(c_cond=16, c_hidden=[16, 32], blocks=[1, 1])
        config.sample.decoder_steps = 2
    return config


def _stage_b(root: str, runlocal: bool) -> ml_collections.ConfigDict:
    config = _decoder(defaults.stage_b(), root, runlocal)
    config.model.update(nhead=[4, 4], inject_effnet=[True, True])
    config.sample.decoder_guidance = 1.0
    config.optimizer.update(lr=1e-3, warmup_steps=100)
    if runlocal:
        config.effnet.resize_jitter = [1.0, 0.5]
        config.model.nhead = [2, 2]
    return config


def _stage_b_tokens(root: str, runlocal: bool) -> ml_collections.ConfigDict:
    """Würstchen v1's Stage B: Paella over the 16x16 indices of Stage A's 1024 codes."""
    config = _decoder(defaults.stage_b_tokens(), root, runlocal)
    config.model.update(c_in=64, num_labels=1024, nhead=[-1, 4])
    config.text.dropout_mode = 'batch'
    config.sample.decoder_guidance = 2.0
    config.optimizer.update(lr=1e-3, warmup_steps=100, b2=0.95)
    if runlocal:
        config.model.update(c_in=16, num_labels=32, nhead=[-1, 2])
    return config


def _stage_c(root: str, runlocal: bool, backbone: str, latents: str, pixart_recipe: bool) -> ml_collections.ConfigDict:
    config = defaults.stage_c()
    config.total_steps = 3000
    config.input = config_lib.input_config('shapes', image_size=64, batch_size=32)
    config.latents = latents
    config.effnet.update(source=f'{root}/stage_b', image_size=64)
    config.stage_a.source = f'{root}/stage_a'  # read with latents='stage_a'
    # Our jointly trained map is BatchNorm'd to unit variance already; 'v2' is Würstchen's (x + 1)/42.
    config.latent_scaling = 'none'
    config.model.update(backbone=backbone, c=128, depth=4, num_heads=4, dropout=0.0, pos_embed=True, linear_output=True)
    if backbone == 'pixart':  # PixArt-α's DiT on the 8x8 map, one token per cell: 0.97 M params, as the prior's
        config.model.depth = 3
    if backbone == 'stable_cascade':  # Stable Cascade's Stage C, one triplet per level each way: 0.99 M params
        config.model.level_blocks = (1, 1)
    if latents == 'stage_a':  # single-stage on the 16x16x4 Stage A latents: 2x2 patches, again 64 tokens
        config.model.patch_size = 2
    config.text = text_config(runlocal, 't5' if pixart_recipe else 'clip')
    # v-prediction, unweighted: at high noise v ≈ −x0, so the layout the caption sets is what those steps
    # are scored on. With ε-prediction (P2) the same 2000-step demo placed shapes at chance (position
    # 0.16 on 200 fresh prompts); with v, 0.63.
    config.diffusion.update(prediction='v', loss_weight='none')
    config.sample.update(prior_steps=20, prior_timesteps='linspace')
    if pixart_recipe:
        if backbone != 'pixart':
            raise config_lib.ConfigError('<arg>.pixart_recipe', True, "backbone=pixart: the recipe is PixArt-α's")
        config.diffusion.update(process='iddpm', prediction='epsilon', sampler='dpm_solver')
        # Latents at std 4.3 (h / 0.2; the demo's Stage A reports latent_std 0.866): ε-prediction on linear β
        # learns the layout when the signal stands further above the noise. Measured on 200 fresh prompts
        # after 2500 steps: unit std (h / 0.866) position 0.48, Würstchen's h / 0.3764 (std 2.3) 0.62,
        # std 4.3 0.82.
        config.stage_a.scale_factor = 0.2
    config.optimizer.update(lr=1e-3, warmup_steps=100)
    config.eval.grid_columns = 2
    if runlocal:
        config.model.update(c=24 if backbone == 'pixart' else 16, depth=2, num_heads=2, clip_image_channels=8)
        config.sample.prior_steps = 2
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(
        arg,
        stage='a',
        root='workdirs/shapes',
        demo=False,
        runlocal=False,
        backbone='wuerstchen',
        latents='effnet',
        tokens=False,
        pixart_recipe=False,
        hold_out='',
        only='',
    )
    for field in ('hold_out', 'only'):
        if arg[field] and arg[field] not in shapes.COLOURS:
            raise config_lib.ConfigError(
                f'<arg>.{field}', arg[field], f'one of the shapes colours {list(shapes.COLOURS)}'
            )
    if arg.only and arg.only == arg.hold_out:
        raise config_lib.ConfigError('<arg>.only', arg.only, 'a colour other than hold_out: no scene would fit both')
    if arg.stage == 'a':
        config = _stage_a(arg.runlocal)
    elif arg.stage == 'b':
        config = _stage_b_tokens(arg.root, arg.runlocal) if arg.tokens else _stage_b(arg.root, arg.runlocal)
    elif arg.stage == 'c':
        config = _stage_c(arg.root, arg.runlocal, arg.backbone, arg.latents, arg.pixart_recipe)
    else:
        raise config_lib.ConfigError('<arg>.stage', arg.stage, "one of 'a', 'b', 'c'")
    config.eval.batch_size = 64
    config.image_every_steps = config.checkpoint_every_steps = 500
    config.eval_every_steps = 0  # at the end only

    if arg.demo:
        config.total_steps = DEMO_STEPS[arg.stage]
        config.input.shapes.num_test = 64
        config.eval.num_examples = 64
        config.image_every_steps = config.checkpoint_every_steps = config.total_steps // 2
        if arg.stage == 'a':
            config.input.batch_size = 16
            config.loss.adv_weight = 0.0  # the discriminator needs more steps than the demo has

    if arg.runlocal:
        config.total_steps = 6
        config.input.image_size = 16 if arg.stage == 'a' else 32
        config.input.batch_size = 8
        config.input.shapes.update(num_train=64, num_test=16, seed=0)
        config.optimizer.warmup_steps = 1
        config.eval.update(num_examples=16, batch_size=8, num_grid_images=4)
        config.log_every_steps = 2
        config.image_every_steps = config.checkpoint_every_steps = 3
        if arg.stage != 'a':
            config.effnet.image_size = 32
    config.input.shapes.update(hold_out=arg.hold_out, only=arg.only)
    return config
