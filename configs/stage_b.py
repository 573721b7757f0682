"""Stage B at Würstchen v2's size: the 1.06B WuerstchenDiffNeXt decoder on Stage A latents,
conditioned on frozen EfficientNetV2-S maps and CLIP ViT-H tokens (dome272/Wuerstchen `modules.py`
`DiffNeXt`; Pernias et al., arXiv:2306.00637).

  python -m wurst_jax.main --config=configs/stage_b.py:vqgan=/models/wuerstchen/vqgan,effnet=/models/model_v2_stage_b.pt,clip=/models/wuerstchen/text_encoder,tokenizer=/models/wuerstchen/tokenizer \
      --workdir=/ckpt/stage_b --config.input.dataset=my_captions --config.input.data_dir=/data/tfds

No v2 Stage B training script was published; this follows Stable Cascade's `train_b.py` where it
has to choose: the effnet sees the image at 0.75x (768 px maps of 1024 px images) scaled by a
factor in [0.5, 1] per batch, its map is zeroed for 10 % of samples, captions dropped for 5 %;
AdamW 1e-4, 10k warm-up, clip 1.0, p2 loss. `sharding=dp|fsdp|fsdp_tp` (with `tensor=N`) picks the
parallelism preset (default fsdp); `--config.grad_accum_steps=K` splits each batch into K micro-batches.
`python -m wurst_jax.plan` (README) fits batch 256 on a v5p-64 slice with `dots` remat (21 GiB per
chip); XLA's CPU compiler needs `--config.model.remat_policy=full --config.grad_accum_steps=4` to fit
64 x 80 GB, so start there on GPUs until a GPU plan says otherwise.
"""

import ml_collections

from wurst_jax import config_lib, defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(
        arg, vqgan='', effnet='', clip='', tokenizer='', batch=256, res=1024, sharding='fsdp', tensor=1
    )
    config = defaults.stage_b()
    config.total_steps = 1_000_000
    config.dtype = 'bfloat16'
    config.mesh = config_lib.mesh_preset(arg.sharding, arg.tensor)  # dp | fsdp | fsdp_tp (with tensor=N)
    config.input = config_lib.input_config(
        'my_captions', image_size=arg.res, batch_size=arg.batch, crop='random', resize=arg.res
    )
    config.stage_a.source = arg.vqgan
    config.effnet.update(source=arg.effnet, image_size=arg.res * 3 // 4, resize_jitter=[1.0, 0.875, 0.75, 0.625, 0.5])
    config.model.remat_policy = 'dots'
    config.text.update(tokenizer=arg.tokenizer or arg.clip, encoder=arg.clip)
    config.optimizer.update(warmup_steps=10_000, schedule='constant', weight_decay=0.01)
    config.eval.update(num_examples=512, batch_size=32)
    return config
