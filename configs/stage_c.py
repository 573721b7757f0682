"""Stage C with the Würstchen v2 recipe (Pernias et al., arXiv:2306.00637; dome272/Wuerstchen `modules.py`
`Prior` and `train_stage_C.py`): the 1B prior on CLIP bigG tokens.

  python -m wurst_jax.main --config=configs/stage_c.py:clip=/models/clip-bigG,effnet=/models/effnet \
      --workdir=/ckpt/stage_c --config.input.dataset=my_captions --config.input.data_dir=/data/tfds

`clip` is a local transformers CLIP text folder (laion CLIP-ViT-bigG-14: config.json,
model.safetensors, tokenizer.json); `effnet` the semantic compressor (a converted folder,
`model_v2_stage_b.pt`, or a Stage B workdir). Batch 1280, AdamW 1e-4 (torch defaults, weight
decay 0.01), 10k warm-up, clip 1.0, p2 loss, Würstchen t sampling, whole-batch caption dropout
5 %. The effnet sees 768 px images (24x24 maps), in the v2 space (x + 1)/42.
`sharding=dp|fsdp|fsdp_tp` (with `tensor=N`) picks the parallelism preset (default fsdp);
`--config.grad_accum_steps=K` splits each batch into K micro-batches. `backbone=pixart` swaps the
prior for PixArt-α's DiT-XL (width 1152, 28 blocks, 16 heads, one token per map cell: 576 tokens).
"""

import ml_collections

from wurst_jax import config_lib, defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, clip='', effnet='', batch=1280, sharding='fsdp', tensor=1, backbone='wuerstchen')
    config = defaults.stage_c()
    config.total_steps = 1_500_000
    config.dtype = 'bfloat16'  # float32 master weights, bfloat16 compute (the original used bf16 autocast)
    config.mesh = config_lib.mesh_preset(arg.sharding, arg.tensor)  # dp | fsdp | fsdp_tp (with tensor=N)
    config.input = config_lib.input_config(
        'my_captions', image_size=768, batch_size=arg.batch, crop='random', resize=768
    )
    config.effnet.source = arg.effnet
    config.model.update(backbone=arg.backbone, scan_blocks=True, remat_policy='dots')
    if arg.backbone == 'pixart':
        config.model.update(c=1152, depth=28, num_heads=16)
    config.text.update(tokenizer=arg.clip, encoder=arg.clip, dropout_mode='batch')
    config.optimizer.update(warmup_steps=10_000, schedule='constant', weight_decay=0.01)
    # Würstchen's EMA (β 0.9 every 100 updates) is about a per-step decay of 0.9 ** (1 / 100) = 0.999.
    config.ema_decay = 0.999
    config.eval.update(num_examples=1024, batch_size=64)
    return config
