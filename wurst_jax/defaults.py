"""The default config of each model family: every field its code reads, with the value it has
unless a config file says otherwise.

A config file under configs/ starts from its family's defaults and sets what its experiment
changes, so the whole experiment is that file plus these defaults. `validate` refuses any field
that is not here, and `upgrade` fills the fields a config saved by older code lacks.
"""

import ml_collections

from wurst_jax import config_lib
from wurst_jax.config_lib import ConfigError

# Sections whose fields are not ours to list: transformers CLIPTextConfig keyword arguments.
OPEN_SECTIONS = ('text.encoder_config',)


def _common(family: str, *, lr: float) -> ml_collections.ConfigDict:
    config = config_lib.base_config()
    config.model_family = family
    config.input = config_lib.input_config('my_captions', image_size=256, batch_size=64)
    config.optimizer = config_lib.optimizer_config(lr)
    config.eval = ml_collections.ConfigDict(
        dict(data='split', num_examples=256, batch_size=32, use_ema=True, num_grid_images=8, grid_columns=4)
    )
    return config


def _text() -> ml_collections.ConfigDict:
    """A CLIP text encoder (or T5's, `architecture='t5'`) read from a local folder (its tokenizer beside
    it), or trained with the stage over a word list (`tokenizer='words'`); captions dropped for
    classifier-free guidance."""
    return ml_collections.ConfigDict(
        dict(
            architecture='clip',
            tokenizer='',
            vocabulary=[],
            max_length=77,
            encoder='',
            hidden_state='last',
            dropout=0.05,
            dropout_mode='sample',
            encoder_config=ml_collections.ConfigDict(),
        )
    )


def _diffusion() -> ml_collections.ConfigDict:
    """Würstchen's: t = (1 − U)·1.08 + 0.001 clamped, P2 weight, ε-prediction (arXiv:2306.00637 App. A)."""
    return ml_collections.ConfigDict(
        dict(t_sampling='wuerstchen', loss_weight='p2', p2_k=1.0, prediction='epsilon', sampler='ddpm')
    )


def stage_a() -> ml_collections.ConfigDict:
    """The f4 VQGAN at Würstchen's size (dome272/Wuerstchen `vqgan.py`): MSE + VQ + 0.25 commitment, with
    Paella's adversarial term."""
    config = _common('stage_a', lr=3e-4)
    config.model = ml_collections.ConfigDict(
        dict(levels=2, embed_dim=384, bottleneck_blocks=12, latent_channels=4, num_codes=8192, scale_factor=0.3764)
    )
    config.disc = ml_collections.ConfigDict(dict(c_hidden=512, depth=6))
    config.loss = ml_collections.ConfigDict(
        dict(
            mse_weight=1.0,
            vq_weight=1.0,
            commit_weight=0.25,
            adv_weight=0.1,
            adv_start=50_000,
            perceptual_weight=0.0,
            perceptual_weights='',
        )
    )
    config.disc_optimizer = config_lib.optimizer_config(3e-6, schedule='constant')
    return config


def _stage_a_source() -> ml_collections.ConfigDict:
    """A frozen Stage A: `source` (a workdir or converted vqgan) and the latents' divisor `scale_factor`
    (0: the VQGAN's own; the std of its h gives unit-variance latents, as LDM's `scale_by_std`)."""
    return ml_collections.ConfigDict(dict(source='', scale_factor=0.0))


def _decoder(family: str, effnet: dict, model: dict) -> ml_collections.ConfigDict:
    """What both Stage Bs' defaults hold: Stage A's source, the semantic compressor, the UNet's fields
    and the text encoder. The effnet's `arch` (torchvision's architecture) or, when it lists them,
    `stages` (type, expand, kernel, stride, in, out, layers) are read only with `effnet.source='train'`."""
    config = _common(family, lr=1e-4)
    config.stage_a = _stage_a_source()
    trained = dict(stages=[], last_channels=1280, c_latent=16, stochastic_depth=0.2)
    config.effnet = ml_collections.ConfigDict({**trained, **effnet})
    unet = dict(c_r=64, patch_size=2, c_cond=1024, kernel_size=3, dropout=0.1, remat_policy='none')
    config.model = ml_collections.ConfigDict({**unet, **model})
    config.text = _text()
    return config


def stage_b() -> ml_collections.ConfigDict:
    """The v2 diffusion decoder (dome272/Wuerstchen `modules.py` `DiffNeXt`) on Stage A latents, with the
    semantic compressor frozen from `effnet.source` or trained jointly (`source='train'`)."""
    effnet = dict(source='', image_size=768, dropout=0.1, resize_jitter=[1.0], arch='efficientnet_v2_s')
    levels = dict(
        c_hidden=[320, 640, 1280, 1280],
        nhead=[-1, 10, 20, 20],
        blocks=[4, 4, 14, 4],
        level_config=['CT', 'CTA', 'CTA', 'CTA'],
        inject_effnet=[False, True, True, True],
    )
    config = _decoder('stage_b', effnet, levels)
    config.init = ml_collections.ConfigDict(dict(decoder=''))  # a decoder to start from: a diffusers folder
    config.diffusion = _diffusion()
    config.sample = ml_collections.ConfigDict(dict(decoder_steps=12, decoder_guidance=0.0))
    return config


def stage_b_tokens() -> ml_collections.ConfigDict:
    """Würstchen v1's Stage B at its released size (dome272/Wuerstchen `modules.py` `Paella`,
    `train_stage_B.py`): Paella over Stage A's 8192 codes, CLIP ViT-H text, the effnet trained jointly."""
    # For a whole batch: the map zeroed with p `dropout`, else noised with p `noise` to t ~ U(0, noise_t_max).
    effnet = dict(source='train', image_size=384, arch='efficientnet_v2_l', dropout=0.05, noise=0.3, noise_t_max=0.5)
    model = dict(
        c_in=256,
        num_labels=8192,
        c_hidden=[640, 1280, 1280],
        nhead=[-1, 16, 16],
        blocks=[4, 12, 4],
        level_config=['CT', 'CTA', 'CTA'],
        self_attn=True,
        scan_blocks=False,
    )
    config = _decoder('stage_b_tokens', effnet, model)
    config.text.dropout_mode = 'batch'
    config.diffusion = ml_collections.ConfigDict(dict(t_sampling='wuerstchen'))
    config.loss = ml_collections.ConfigDict(dict(label_smoothing=0.1, min_weight=0.3))
    # `sample`'s defaults in dome272/Wuerstchen `modules.py`.
    config.sample = ml_collections.ConfigDict(
        dict(decoder_steps=12, decoder_guidance=8.0, decoder_temperature=[0.7, 0.3], decoder_mode='multinomial')
    )
    return config


def stage_c() -> ml_collections.ConfigDict:
    """The text-conditional prior on the semantic compressor's map (`latents='effnet'`) or on Stage A's
    latents (`latents='stage_a'`, a single diffusion stage), with the Würstchen prior or PixArt-α's DiT
    (`model.backbone`)."""
    config = _common('stage_c', lr=1e-4)
    config.latents = 'effnet'
    config.latent_scaling = 'v2'  # Würstchen's (x + 1) / 42 of the map; 'none' leaves it as it is
    config.stage_a = _stage_a_source()  # read with latents='stage_a'
    config.effnet = ml_collections.ConfigDict(dict(source='', image_size=768))
    config.init = ml_collections.ConfigDict(dict(prior=''))  # weights to start from: a folder, file or workdir
    config.model = ml_collections.ConfigDict(
        dict(
            backbone='wuerstchen',
            c=1536,
            depth=32,
            num_heads=24,
            c_r=64,
            dropout=0.1,
            scan_blocks=False,
            remat_policy='none',
            pos_embed=False,
            linear_output=False,
            patch_size=1,
            micro_conditions=False,
            # backbone='stable_cascade': triplets per level on the way down (up: mirrored); image embedding width
            level_blocks=(8, 24),
            clip_image_channels=768,
        )
    )
    config.text = _text()
    config.diffusion = _diffusion()
    # 'iddpm': PixArt-α's discrete process (PixArt backbone only); num_steps its length, sampler then
    # 'dpm_solver' or 'iddpm'.
    config.diffusion.update(process='cosine', num_steps=1000)
    config.sample = ml_collections.ConfigDict(
        # prior_shift moves the sampled logSNR by 2·ln(1/shift), prior_cfg_rescale blends the guided ε back
        # towards the conditional one's std (Stable Cascade's GDF sampling: 2 and 0.7).
        dict(
            prior_steps=60,
            prior_timesteps='stage_c_default',
            prior_guidance=4.0,
            prior_shift=1.0,
            prior_cfg_rescale=0.0,
        )
    )
    return config


def pixel() -> ml_collections.ConfigDict:
    """A pixel-space denoiser: the Shallow-UViT core, or it grown into a UNet by `model.level_channels`
    (Vasconcelos et al., arXiv:2405.16759)."""
    config = _common('pixel', lr=1e-3)
    config.model = ml_collections.ConfigDict(dict(c=128, c_r=64, depth=4, num_heads=4, level_channels=(), patch_size=2))
    config.eval.alignment_prompts = 0  # fresh captions scored by the shapes detector; 0: none
    config.text = _text()
    # Simple Diffusion's shifted cosine schedule relative to a `schedule_base` px image.
    config.diffusion = ml_collections.ConfigDict(dict(schedule_base=64.0, sampler='ddim'))
    config.sample = ml_collections.ConfigDict(dict(steps=20, guidance=4.0))
    config.grow = ml_collections.ConfigDict(dict(from_workdir='', phase=1))
    return config


FAMILY_DEFAULTS = {
    'stage_a': stage_a,
    'stage_b': stage_b,
    'stage_b_tokens': stage_b_tokens,
    'stage_c': stage_c,
    'pixel': pixel,
}


def for_family(family: str) -> ml_collections.ConfigDict:
    """The default config of `family`."""
    if family not in FAMILY_DEFAULTS:
        raise ConfigError('model_family', family, f'one of {sorted(FAMILY_DEFAULTS)}')
    return FAMILY_DEFAULTS[family]()


def check_known_fields(config: ml_collections.ConfigDict) -> None:
    """ConfigError for the first field that its family's defaults do not have, naming the nearest one:
    a misspelt field in a config file would otherwise be silently ignored."""

    def walk(node, known, prefix: str) -> None:
        for name, value in node.items():
            path = f'{prefix}{name}'
            if name not in known:
                shown = '{...}' if isinstance(value, ml_collections.ConfigDict) else value
                raise config_lib.unknown_field_error(path, shown, tuple(known))
            if isinstance(value, ml_collections.ConfigDict) and path not in OPEN_SECTIONS:
                walk(value, known[name], f'{path}.')

    walk(config, for_family(config.model_family), '')


def upgrade(saved: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A config saved with a checkpoint, brought up to date: the fields added since it was saved take
    their defaults (so a run trained by older code still samples, evaluates and resumes)."""

    def merge(default: dict, ours: dict) -> dict:
        return {
            **default,
            **{
                k: merge(default[k], v) if isinstance(v, dict) and isinstance(default.get(k), dict) else v
                for k, v in ours.items()
            },
        }

    plain = saved.to_dict()
    return ml_collections.ConfigDict(merge(for_family(plain['model_family']).to_dict(), plain))
