"""Stage A at Würstchen's size: levels 192/384, 12 bottleneck blocks, 8192 codes (18,406,894 params).

  python -m wurst_jax.main --config=configs/stage_a.py --workdir=gs://.../stage_a \
      --config.input.dataset=my_captions --config.input.data_dir=/data/tfds

No Stage A training script was published; the losses follow Würstchen's VQModel (MSE + VQ +
0.25 commitment; dome272/Wuerstchen `vqgan.py`) with the adversarial term of Paella's VQ recipe, and
AdamW 3e-4 with 10 % warm-up (dome272/Paella `ongoing_research/text-to-video/train_vivq.py` and
`loss/loss.py`). By default it reads the bundled `photos` so the config runs anywhere.
"""

import ml_collections

from wurst_jax import config_lib, defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, res=256, batch=256, runlocal=False)
    config = defaults.stage_a()
    config.total_steps = 500_000
    config.input = config_lib.input_config(
        'photos', image_size=arg.res, batch_size=arg.batch, crop='random', flip=True, resize=arg.res
    )
    config.optimizer.warmup_steps = 50_000  # 10 %
    config.checkpoint_every_steps = 5000

    if arg.runlocal:
        config.total_steps = 2
        config.input.update(image_size=64, resize=64, batch_size=8)
        config.loss.adv_start = 1
        config.optimizer.warmup_steps = 1
        config.eval.update(num_examples=8, batch_size=8)
    return config
