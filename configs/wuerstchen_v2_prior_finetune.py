"""Fine-tune the released Würstchen v2 prior on your captioned images (diffusers' research
fine-tuning recipe, `examples/research_projects/wuerstchen/text_to_image/train_text_to_image_prior.py`
and its README): uniform t, plain ε-MSE, AdamW 1e-5.

  python -m wurst_jax.convert --component=prior --src=/models/wuerstchen-prior/prior --dst=/tmp/x  # (optional check)
  python -m wurst_jax.main --config=configs/wuerstchen_v2_prior_finetune.py:prior=/models/wuerstchen-prior/prior,clip=/models/wuerstchen-prior/text_encoder,tokenizer=/models/wuerstchen-prior/tokenizer,effnet=/models/model_v2_stage_b.pt,images=/data/my_images \
      --workdir=/ckpt/prior_finetune

`prior` is a diffusers WuerstchenPrior folder (or `model_v3_stage_c.pt`), `clip`/`tokenizer` the
CLIP bigG text encoder and tokenizer folders of the same pipeline, `effnet` the semantic compressor,
`images` a folder of images with captions (see README, Data). All are local: nothing downloads.
"""
import ml_collections

from wurst_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, prior='', clip='', tokenizer='', effnet='', images='', batch=16, res=768,
                               steps=10_000)
    config = config_lib.base_config()
    config.model_family = 'stage_c'
    config.total_steps = arg.steps
    config.input = config_lib.input_config('image_folder', image_size=arg.res, batch_size=arg.batch,
                                           crop='random', resize=arg.res)
    config.input.folder = arg.images
    config.input.eval_split = 'train'  # a folder has one split; the held-out loss reads its first images
    config.effnet = ml_collections.ConfigDict(dict(source=arg.effnet, image_size=arg.res))
    config.latent_scaling = 'v2'
    config.init = ml_collections.ConfigDict(dict(prior=arg.prior))
    # The architecture comes from the checkpoint; these are the training-time options.
    config.model = ml_collections.ConfigDict(dict(backbone='wuerstchen', c=1536, depth=32, num_heads=24, c_r=64,
                                                  dropout=0.1, patch_size=1, scan_blocks=True, remat_policy='dots'))
    config.text = ml_collections.ConfigDict(dict(
        tokenizer=arg.tokenizer or arg.clip, max_length=77, encoder=arg.clip, hidden_state='last', dropout=0.05,
        dropout_mode='sample', encoder_config=ml_collections.ConfigDict()))
    config.diffusion = ml_collections.ConfigDict(dict(t_sampling='uniform', loss_weight='none', p2_k=1.0,
                                                    prediction='epsilon', sampler='ddpm'))
    config.sample = ml_collections.ConfigDict(dict(prior_steps=60, prior_timesteps='stage_c_default',
                                                  prior_guidance=4.0))
    config.optimizer = config_lib.optimizer_config(1e-5, warmup_steps=100, schedule='constant', weight_decay=0.01)
    config.ema_decay = 0.999
    config.eval = ml_collections.ConfigDict(dict(
        data='split', num_examples=64, batch_size=8, use_ema=True, num_grid_images=8, grid_columns=4))
    config.log_every_steps = 50
    config.image_every_steps = 1000
    config.checkpoint_every_steps = 1000
    return config
