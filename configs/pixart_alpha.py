"""PixArt-α's three-stage training plan (Chen et al., arXiv:2310.00426, App. A.5 and Table 4) as
three Stage C runs, each starting from the one before (`init=` its workdir):

  stage=1  pixel dependency: PixArt-α re-parameterised from a class-conditional DiT folder (`dit=`,
           e.g. DiT-XL-2-256 in diffusers form; the paper's §2.3), on class-labelled images captioned
           with their class names, 256 px, batch 1024, 300k steps.
  stage=2  text-image alignment: dense captions (SAM with LLaVA captions), 256 px, batch 11392, 150k steps.
  stage=3  high aesthetics: 512 px, multi-aspect buckets (a batch per bucket of PixArt's 40-ratio
           table) and PixArtMS's size and aspect micro-conditions (their embedders start fresh),
           batch 2560, 100k steps.

  python -m wurst_jax.main --config=configs/pixart_alpha.py:stage=1,dit=/models/DiT-XL-2-256,t5=/models/t5-v1_1-xxl,stage_a=/models/vqgan \
      --workdir=/ckpt/pixart1 --config.input.dataset=imagenet_captions --config.input.data_dir=/data/tfds
  python -m wurst_jax.main --config=configs/pixart_alpha.py:stage=2,init=/ckpt/pixart1,t5=...,stage_a=... \
      --workdir=/ckpt/pixart2 --config.input.dataset=sam_llava
  python -m wurst_jax.main --config=configs/pixart_alpha.py:stage=3,init=/ckpt/pixart2,t5=...,stage_a=... \
      --workdir=/ckpt/pixart3 --config.input.dataset=aesthetic

Fine-tuning a released model: `stage=2` (or 3) with `init=` a PixArt-XL-2 `.pth` or diffusers
transformer folder. `t5=` is a local transformers T5 encoder folder with its `tokenizer.json` (e.g.
PixArt-alpha's `t5-v1_1-xxl`, saved once by transformers if it holds only `spiece.model`);
`clip=FOLDER` conditions on a CLIP text encoder instead. Precompute the T5 states once, as PixArt-α's
`tools/extract_features.py` does, so the step never runs T5:
`python -m wurst_jax.precompute --config=configs/pixart_alpha.py:stage=2,t5=...,stage_a=... --dtype=bfloat16`,
then `--config.input.precomputed=DIR`.

The denoiser diffuses Stage A latents directly (`latents='stage_a'`, one diffusion stage as PixArt
on its VAE; 4 channels, so the DiT's patch embedding fits). `latents=effnet,effnet=...` trains it on
Würstchen's 16-channel map instead (no DiT start then: stage 1 starts from scratch).

What is PixArt's (paper §2.4, §3.1 and App. A.5; the `configs/pixart_config/` files and `train_scripts/train.py`
of PixArt-alpha/PixArt-alpha): DiT-XL/2 (1152 wide, 28 blocks, 16 heads, patch 2); T5-XXL's states of 120 tokens with their
padding mask in the cross-attention; iDDPM's 1000-step
linear β process with the learned-range variance of the DiT's second half of output channels and the
hybrid loss (`diffusion.process='iddpm'`); AdamW (eps 1e-10) at 2e-5 scaled by √(batch/256) (PixArt's
`auto_lr` rule 'sqrt'), constant after 1000 warm-up steps, weight decay 0.03, gradient clipping at 0.01;
EMA 0.9999; caption dropout 10 %; the batch sizes and step counts above; the bucket table; sampling with
DPM-Solver++ at 20 steps and guidance 4.5 (`--prior_sampler=iddpm` for the ancestral sampler). What is
ours: dropped captions become the empty caption's T5 states (PixArt-α puts a fixed random
`y_embedding` in their place, which diffusers' pipeline never uses: it samples with the empty caption's). The
learning rate is computed here from the plan's batch: set `--config.optimizer.lr` with
`--config.input.batch_size`.
"""

import math

import ml_collections

from wurst_jax import config_lib, defaults

# stage -> (image size, global batch, steps)
PLAN = {1: (256, 1024, 300_000), 2: (256, 11_392, 150_000), 3: (512, 2_560, 100_000)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(
        arg,
        stage=1,
        dit='',
        init='',
        t5='',
        clip='',
        stage_a='',
        latents='stage_a',
        effnet='',
        sharding='fsdp',
        tensor=1,
        runlocal=False,
    )
    if arg.stage not in PLAN:
        raise config_lib.ConfigError('<arg>.stage', arg.stage, f'one of {sorted(PLAN)}')
    size, batch, steps = PLAN[arg.stage]
    config = defaults.stage_c()
    config.total_steps = steps
    config.dtype = 'bfloat16'
    config.mesh = config_lib.mesh_preset(arg.sharding, arg.tensor)
    config.input = config_lib.input_config('my_captions', image_size=size, batch_size=batch, crop='random')
    config.input.aspect_buckets = arg.stage == 3
    config.latents = arg.latents
    config.stage_a.source = arg.stage_a
    config.effnet.update(source=arg.effnet, image_size=size * 3)  # 24x24 at 256 px
    config.latent_scaling = 'none' if arg.latents == 'stage_a' else 'v2'
    # Stage 1 starts from the DiT, later stages from the run before.
    config.init.prior = arg.dit if arg.stage == 1 else arg.init
    config.model.update(
        backbone='pixart',
        c=1152,
        depth=28,
        num_heads=16,
        dropout=0.0,
        patch_size=2,
        scan_blocks=True,
        remat_policy='dots',
        micro_conditions=arg.stage == 3,
    )
    if arg.clip:  # a CLIP text encoder instead of PixArt's T5
        config.text.update(tokenizer=arg.clip, encoder=arg.clip, dropout=0.1)
    else:  # T5-v1.1-XXL's states of 120 tokens with their mask (PixArt-α §2.4)
        config.text.update(architecture='t5', tokenizer=arg.t5, encoder=arg.t5, max_length=120, dropout=0.1)
    config.diffusion.update(process='iddpm', prediction='epsilon', sampler='dpm_solver')
    config.sample.update(prior_steps=20, prior_timesteps='linspace', prior_guidance=4.5)
    lr = 2e-5 * math.sqrt(batch / 256)
    config.optimizer.update(lr=lr, warmup_steps=1000, schedule='constant', weight_decay=0.03, grad_clip=0.01, eps=1e-10)
    config.ema_decay = 0.9999
    config.eval.update(num_examples=1024, batch_size=64)
    if arg.runlocal:  # the plan's shape at toy size, for tests: the DiT's width comes from its folder
        config.total_steps = 2
        config.dtype = 'float32'
        config.mesh = config_lib.mesh_preset('dp')
        config.input.image_size = 16 if arg.stage < 3 else 32
        config.input.batch_size = 8
        config.model.update(c=24, depth=2, num_heads=2, scan_blocks=False, remat_policy='none')
        config.sample.prior_steps = 2
        config.optimizer.warmup_steps = 0
        config.eval.update(num_examples=8, batch_size=8, num_grid_images=2, grid_columns=2)
        config.log_every_steps = config.image_every_steps = config.checkpoint_every_steps = 1
    return config
