"""LoRA on the released Würstchen v2 prior: configs/wuerstchen_v2_prior_finetune.py with the prior frozen
and rank-4 adapters on its attention (diffusers' research recipe,
`examples/research_projects/wuerstchen/text_to_image/train_text_to_image_lora_prior.py`: rank 4,
AdamW 1e-4, the attention's q/k/v/out).

  python -m wurst_jax.main --config=configs/wuerstchen_v2_prior_lora.py:prior=/models/wuerstchen-prior/prior,clip=/models/wuerstchen-prior/text_encoder,tokenizer=/models/wuerstchen-prior/tokenizer,effnet=/models/model_v2_stage_b.pt,images=/data/my_images \
      --workdir=/ckpt/prior_lora
  python -m wurst_jax.export --workdir=/ckpt/prior_lora --out=/ckpt/prior_lora/diffusers  # load_lora_weights reads it

Arguments: the fine-tune config's, plus rank, alpha and targets (`lora.targets`: preset names or regular
expressions over param paths, e.g. targets=attention,feed_forward). `--config.lora.base_dtype=bfloat16`
holds the frozen prior in bfloat16.
"""

import os

import ml_collections

from wurst_jax import config_lib

LORA_ARGS = dict(rank=4, alpha=4.0, targets='attention')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    ours, rest = config_lib.split_arg(arg, LORA_ARGS)
    lora = config_lib.parse_arg(ours, **LORA_ARGS)
    here = os.path.dirname(os.path.abspath(__file__))
    config = config_lib.load_config_file(f'{here}/wuerstchen_v2_prior_finetune.py:{rest}')
    config.lora.update(rank=lora.rank, alpha=lora.alpha, targets=lora.targets)
    config.optimizer.update(lr=1e-4, weight_decay=1e-2)
    return config
