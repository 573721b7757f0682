"""Fine-tune Stable Cascade's Stage C on your captioned images, as Stability-AI/StableCascade trains it
(`configs/training/finetune_c_3b.yaml`, `finetune_c_1b.yaml`; `train/train_c.py`, `gdf/`): ε-prediction on
the raw EfficientNetV2-S map (no rescaling), t uniform, the adaptive loss weight (3.6 B) or P2 (1 B),
CLIP bigG's hidden_states[-1] and pooled `text_embeds`, captions dropped to "" for 5 % of samples,
AdamW 1e-4, gradient clip 1, no EMA (commented out in the official configs); sampling as its notebook,
20 steps, guidance 4, shift 2, CFG rescale 0.7.

  python -m wurst_jax.main --config=configs/stable_cascade_c.py:prior=/models/stable-cascade-prior/prior,clip=/models/stable-cascade-prior/text_encoder,tokenizer=/models/stable-cascade-prior/tokenizer,effnet=/models/StableCascade/effnet_encoder.safetensors,images=/data/my_images \
      --workdir=/ckpt/stage_c_finetune

`prior` is a diffusers StableCascadeUNet prior folder (`prior` or `prior_lite`) or an original
`stage_c.safetensors` / `stage_c_lite.safetensors`; `size=1b` takes the lite recipe (batch 1024, 10k
steps, P2), the default `3b` the full one (batch 512, 100k steps, adaptive). `clip`/`tokenizer` are the
CLIPTextModelWithProjection (bigG) and tokenizer folders of the same pipeline, `effnet` Stable Cascade's
`effnet_encoder.safetensors`, `images` a folder of captioned images (README, Data). All local.
The CLIP image embedding (image variation, 10 % of samples in the official script) is zeros here.
"""

import ml_collections

from wurst_jax import config_lib, defaults

RECIPES = {  # size -> (batch, steps, loss weight) of the official fine-tuning configs
    '3b': (512, 100_000, 'adaptive'),
    '1b': (1024, 10_000, 'p2'),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(
        arg, prior='', clip='', tokenizer='', effnet='', images='', size='3b', batch=0, res=768, steps=0
    )
    if arg.size not in RECIPES:
        raise config_lib.ConfigError('<arg>.size', arg.size, f'one of {sorted(RECIPES)}')
    batch, steps, loss_weight = RECIPES[arg.size]
    config = defaults.stage_c()
    config.total_steps = arg.steps or steps
    config.input = config_lib.input_config(
        'image_folder', image_size=arg.res, batch_size=arg.batch or batch, crop='random', resize=arg.res
    )
    config.input.folder = arg.images
    config.input.eval_split = 'train'  # a folder has one split; the held-out loss reads its first images
    config.effnet.update(source=arg.effnet, image_size=arg.res)  # 768 px -> the 24 x 24 map
    config.latent_scaling = 'none'
    config.init.prior = arg.prior
    # The architecture comes from the checkpoint; these are the training-time options.
    config.model.update(backbone='stable_cascade', dropout=0.1, scan_blocks=True, remat_policy='dots')
    config.text.update(tokenizer=arg.tokenizer or arg.clip, encoder=arg.clip, hidden_state='penultimate', dropout=0.05)
    config.text.dropout_mode = 'sample'
    config.diffusion.update(
        t_sampling='uniform', loss_weight=loss_weight, prediction='epsilon', sampler='stable_cascade'
    )
    config.optimizer.update(lr=1e-4, warmup_steps=1, schedule='constant', weight_decay=0.01, grad_clip=1.0)
    config.ema_decay = 0.0
    config.eval.update(num_examples=64, batch_size=8, use_ema=False)
    config.sample.update(prior_steps=20, prior_timesteps='linspace', prior_guidance=4.0)
    config.sample.update(prior_shift=2.0, prior_cfg_rescale=0.7)
    config.log_every_steps = 50
    config.image_every_steps = 1000
    config.checkpoint_every_steps = 1000
    config.eval_every_steps = 0  # at the end only
    return config
