"""Offline evaluation of a text-to-image run: FID, CLIP score, CMMD (and alignment on `shapes`).

  python -m wurst_jax.evaluate --config=configs/eval.py --config.workdir=RUN --config.prompts=FILE \
      [--config.reference_stats=REF.npz] [--config.inception_weights=pt_inception-2015-12-05-6726825d.pth] \
      [--config.clip_weights=DIR] [--config.follow=True]

RUN holds stage_b/ and stage_c/ (what `wurst_jax.demo` writes); every Stage C checkpoint is scored
with its EMA params, one image per prompt. Each metric needs local files and is skipped, with the
reason in metrics.json, when they are not given: FID needs inception_weights and reference_stats
(made by `python -m wurst_jax.evaluate.reference_stats`), CLIP score needs clip_weights (a local
Hugging Face CLIPModel folder), CMMD needs clip_weights and a reference file made with them.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.workdir = ''  # the run root: RUN/stage_c (scored) and RUN/stage_b (its decoder)
    config.prompts = ''  # UTF-8 text file, one prompt per line
    config.out_dir = ''  # default RUN/eval: STEP/metrics.json, STEP/grid.png, TensorBoard events
    config.steps = ''  # comma-separated Stage C steps to score; default every checkpoint
    config.follow = False  # wait for new checkpoints until training writes its completion marker
    config.poll_seconds = 60
    config.multihost = False  # jax.distributed.initialize(); prompts are split across processes

    config.reference_stats = ''  # .npz with mu, sigma (and clip_embeds for CMMD)
    config.inception_weights = ''  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth or a .safetensors
    config.fid_resize = 'clean'  # 'clean' (clean-fid, PIL bicubic) or 'legacy' (pytorch-fid, bilinear)
    config.clip_weights = ''  # local HF CLIPModel folder; CMMD's network is clip-vit-large-patch14-336
    config.clip_score = 'torchmetrics'  # 'torchmetrics' (100 cos), 'hessel' (2.5 max(cos, 0)) or 'cosine'
    config.cmmd_sigma = 10.0
    config.cmmd_scale = 1000.0

    config.seed = 0
    config.batch_size = 32  # images generated (and embedded) per call on each process
    config.prior_steps = 0  # 0: the Stage C config's sampling steps
    config.decoder_steps = 0  # 0: the Stage B config's
    config.prior_guidance = -1.0  # negative: the Stage C config's
    config.decoder_guidance = -1.0  # negative: the Stage B config's
    config.decoder_temperature = ''  # 'START,END' for a token Stage B (Würstchen v1); '': its config's
    config.negative_prompt = ''  # the unconditional caption of guidance in both stages; '': the empty caption
    config.height = 0  # image size in px; 0: the stages' trained size (any size they make, non-square too)
    config.width = 0
    config.num_grid_images = 16
    return config
