"""LoRA on the released Würstchen v2 decoder (Stage B): configs/stage_b.py started from a converted
WuerstchenDiffNeXt (`init.decoder`), the decoder frozen and rank-4 adapters on its attention, trained on
a folder of captioned images with the frozen Stage A, effnet and CLIP ViT-H text encoder of the
released decoder pipeline. The optimizer is the prior LoRA's (AdamW 1e-4, weight decay 1e-2).

  python -m wurst_jax.main --config=configs/wuerstchen_v2_decoder_lora.py:decoder=/models/wuerstchen/decoder,vqgan=/models/wuerstchen/vqgan,effnet=/models/model_v2_stage_b.pt,clip=/models/wuerstchen/text_encoder,tokenizer=/models/wuerstchen/tokenizer,images=/data/my_images \
      --workdir=/ckpt/decoder_lora
  python -m wurst_jax.export --workdir=/ckpt/decoder_lora --out=/ckpt/decoder_lora/diffusers  # decoder.* LoRA keys

`decoder` is the diffusers folder of the WuerstchenDiffNeXt (the decoder/ folder of the released
pipeline), `images` a folder of images with captions (README, Data); the other arguments are
configs/stage_b.py's, plus rank, alpha and targets (`lora.targets`).
"""

import os

import ml_collections

from wurst_jax import config_lib

OWN_ARGS = dict(decoder='', images='', batch=8, res=1024, steps=10_000, rank=4, alpha=4.0, targets='attention')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    ours, rest = config_lib.split_arg(arg, OWN_ARGS)
    own = config_lib.parse_arg(ours, **OWN_ARGS)
    here = os.path.dirname(os.path.abspath(__file__))
    passed = ','.join(filter(None, (rest, f'batch={own.batch},res={own.res}')))
    config = config_lib.load_config_file(f'{here}/stage_b.py:{passed}')
    config.total_steps = own.steps
    config.input = config_lib.input_config(
        'image_folder', image_size=own.res, batch_size=own.batch, crop='random', resize=own.res
    )
    config.input.folder = own.images
    config.input.eval_split = 'train'  # a folder has one split; the held-out loss reads its first images
    config.init.decoder = own.decoder
    config.lora.update(rank=own.rank, alpha=own.alpha, targets=own.targets)
    config.optimizer.update(lr=1e-4, warmup_steps=100, schedule='constant', weight_decay=1e-2)
    config.eval.update(num_examples=64, batch_size=8)
    config.log_every_steps = 50
    config.image_every_steps = 1000
    config.checkpoint_every_steps = 1000
    config.eval_every_steps = 0  # at the end only
    return config
