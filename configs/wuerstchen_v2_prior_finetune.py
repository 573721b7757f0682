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

from wurst_jax import config_lib, defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(
        arg, prior='', clip='', tokenizer='', effnet='', images='', batch=16, res=768, steps=10_000
    )
    config = defaults.stage_c()
    config.total_steps = arg.steps
    config.input = config_lib.input_config(
        'image_folder', image_size=arg.res, batch_size=arg.batch, crop='random', resize=arg.res
    )
    config.input.folder = arg.images
    config.input.eval_split = 'train'  # a folder has one split; the held-out loss reads its first images
    config.effnet.update(source=arg.effnet, image_size=arg.res)
    config.init.prior = arg.prior
    # The architecture comes from the checkpoint; these are the training-time options.
    config.model.update(scan_blocks=True, remat_policy='dots')
    config.text.update(tokenizer=arg.tokenizer or arg.clip, encoder=arg.clip)
    config.diffusion.update(t_sampling='uniform', loss_weight='none')
    config.optimizer.update(lr=1e-5, warmup_steps=100, schedule='constant', weight_decay=0.01)
    config.eval.update(num_examples=64, batch_size=8)
    config.log_every_steps = 50
    config.image_every_steps = 1000
    config.checkpoint_every_steps = 1000
    config.eval_every_steps = 0  # at the end only
    return config
