"""Würstchen v1's Stage B: Paella predicting Stage A's 8192 codebook indices, conditioned on a jointly
trained EfficientNetV2-L map and CLIP ViT-H tokens (Pernias et al., arXiv:2306.00637; dome272/Wuerstchen
`modules.py` `Paella` and `train_stage_B.py`).

  python -m wurst_jax.main --config=configs/stage_b_v1.py:vqgan=/models/vqgan_f4_v1_500k.pt,clip=/models/clip-vit-h \
      --workdir=/ckpt/stage_b_v1 --config.input.dataset=my_captions --config.input.data_dir=/data/tfds

`vqgan` is a Stage A workdir or a converted or original VQGAN file; `clip` a local transformers CLIP
text folder (laion CLIP-ViT-H-14: config.json, model.safetensors, tokenizer.json). The official
recipe: 512 px random crops of images resized to a 512 px shorter side, the effnet seeing them at
384 px (12x12 maps), batch 384, AdamW 1e-4 with β (0.9, 0.95) (weight decay at torch's 0.01), 10k
warm-up then constant, clip 1.0, EMA 0.999 per step (0.9 every 100 updates), captions of the whole
batch dropped 5 % of the time. `effnet=PATH` freezes a trained effnet instead. `sharding=dp|fsdp|fsdp_tp`
(with `tensor=N`) picks the parallelism preset (default fsdp).
"""

import ml_collections

from wurst_jax import config_lib, defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, vqgan='', clip='', effnet='train', batch=384, res=512, sharding='fsdp', tensor=1)
    config = defaults.stage_b_tokens()
    config.total_steps = 1_500_000
    config.dtype = 'bfloat16'  # float32 master weights, bfloat16 compute (the original used bf16 autocast)
    config.mesh = config_lib.mesh_preset(arg.sharding, arg.tensor)
    config.input = config_lib.input_config(
        'my_captions', image_size=arg.res, batch_size=arg.batch, crop='random', resize=arg.res
    )
    config.stage_a.source = arg.vqgan
    config.effnet.update(source=arg.effnet, image_size=arg.res * 3 // 4)
    config.model.remat_policy = 'dots'
    config.text.update(tokenizer=arg.clip, encoder=arg.clip)
    config.optimizer.update(warmup_steps=10_000, schedule='constant', weight_decay=0.01, b2=0.95)
    config.ema_decay = 0.999
    config.eval.update(num_examples=512, batch_size=32)
    return config
