"""Every config loads and validates; bad values are rejected naming the field."""

import os
import subprocess
import sys

import ml_collections
import pytest

from conftest import CONFIGS, REPO, load_config
from wurst_jax import config_lib, defaults, tasks

# Recipes for real data need local weights (CLIP, effnet) that the user passes as config arguments.
NEEDS_LOCAL_FILES = {
    'stage_b': 'stage_a.source',
    'stage_c': 'effnet.source',
    'pixart_alpha': 'stage_a.source',
    'wuerstchen_v2_prior_finetune': 'input.folder',
    'wuerstchen_v2_prior_lora': 'input.folder',
    'wuerstchen_v2_decoder_lora': 'input.folder',
    'stable_cascade_c': 'input.folder',
    'stage_b_v1': 'stage_a.source',
    'lora_shapes': 'stage_a.source',  # the Stage A run the experiment's commands train first
}


@pytest.mark.parametrize('path', [p for p in CONFIGS if p.stem not in NEEDS_LOCAL_FILES], ids=lambda p: p.stem)
@pytest.mark.parametrize('arg', [None, 'runlocal'])
def test_every_config_loads_and_validates(path, arg):
    config = load_config(path.stem, arg)
    tasks.validate(config)
    assert config.total_steps > 0


@pytest.mark.parametrize('name', sorted(NEEDS_LOCAL_FILES))
def test_recipes_name_the_missing_local_files(name):
    config = load_config(name, None)
    assert config.total_steps > 0
    with pytest.raises(config_lib.ConfigError, match=NEEDS_LOCAL_FILES[name].replace('.', r'\.')):
        tasks.validate(config)


@pytest.mark.parametrize(
    'field, value',
    [
        ('total_steps', 0),
        ('mesh.data', 0),
        ('optimizer.schedule', 'linear'),
        ('optimizer.warmup_steps', 10**9),
        ('optimizer.lr', -1.0),
        ('input.crop', 'middle'),
        ('input.image_size', 30),
        ('dtype', 'float16'),
        ('ema_decay', 1.0),
        ('model.embed_dim', 15),
        ('loss.adv_start', -1),
        ('model_family', 'stage_z'),
    ],
)
def test_bad_value_is_rejected_with_its_name(field, value):
    config = load_config('shapes', 'runlocal')
    node = config
    *parents, leaf = field.split('.')
    for part in parents:
        node = node[part]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(config_lib.ConfigError) as err:
        tasks.validate(config)
    assert f'config.{field}=' in str(err.value)


@pytest.mark.parametrize(
    'field, value, backbone',
    [
        ('model.backbone', 'unet', 'wuerstchen'),
        ('model.c', 30, 'pixart'),  # PixArt's sin-cos positions need a multiple of 4
        ('model.patch_size', 0, 'pixart'),
        ('model.level_blocks', (2,), 'stable_cascade'),
        ('model.clip_image_channels', 0, 'stable_cascade'),
        ('sample.prior_shift', 0.0, 'stable_cascade'),
        ('sample.prior_cfg_rescale', 1.5, 'wuerstchen'),
    ],
)
def test_stage_c_backbone_fields_are_checked(field, value, backbone):
    config = load_config('shapes', f'stage=c,runlocal,backbone={backbone}')
    group, name = field.split('.')
    config[group][name] = value
    with pytest.raises(config_lib.ConfigError, match=f'config.{field}='):
        tasks.validate(config)


def test_two_minus_one_mesh_axes_rejected():
    config = load_config('shapes', 'runlocal')
    config.mesh.fsdp = -1
    with pytest.raises(config_lib.ConfigError, match='at most one axis'):
        tasks.validate(config)


def test_every_family_has_its_defaults():
    """A family without defaults could not be validated, nor its old saved configs upgraded."""
    assert set(defaults.FAMILY_DEFAULTS) == set(tasks.FAMILIES)
    for family in tasks.FAMILIES:
        assert defaults.for_family(family).model_family == family


@pytest.mark.parametrize(
    'arg',
    ['stage=a,runlocal', 'stage=b,runlocal', 'stage=c,runlocal', 'stage=c,backbone=pixart,latents=stage_a,runlocal'],
)
def test_upgrade_leaves_a_current_config_as_it_is(arg):
    config = load_config('shapes', arg)
    assert defaults.upgrade(config).to_dict() == config.to_dict()


def test_upgrade_fills_the_fields_an_older_saved_config_lacks():
    """Older code saved Stage C configs without these fields: they take the values that code used."""
    saved = load_config('shapes', 'stage=c,runlocal').to_dict()
    for section, name in [
        ('', 'latents'),
        ('', 'init'),
        ('model', 'pos_embed'),
        ('model', 'micro_conditions'),
        ('diffusion', 'prediction'),
        ('input', 'aspect_buckets'),
        ('input', 'bucket_multiple'),
    ]:
        (saved[section] if section else saved).pop(name)
    saved['model']['c'] = 48  # and what it did save stays
    upgraded = defaults.upgrade(ml_collections.ConfigDict(saved))
    assert upgraded.latents == 'effnet' and upgraded.init.prior == '' and upgraded.model.pos_embed is False
    assert upgraded.model.micro_conditions is False and upgraded.diffusion.prediction == 'epsilon'
    assert upgraded.input.aspect_buckets is False and upgraded.input.bucket_multiple == 0
    assert upgraded.model.c == 48 and upgraded.model.linear_output is True
    defaults.check_known_fields(upgraded)


def test_unknown_config_argument_rejected():
    with pytest.raises(config_lib.ConfigError, match='stagee'):
        load_config('shapes', 'stagee=a')


def test_main_rejects_bad_value_before_compiling(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'wurst_jax.main',
            '--config=configs/shapes.py:runlocal',
            f'--workdir={tmp_path}',
            '--config.input.crop=middle',
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "config.input.crop='middle'" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing was built or written


def test_text_and_precomputed_fields_are_checked():
    from wurst_jax.tasks import conditioning
    from wurst_jax.tasks.conditioning import validate_diffusion

    text = load_config('shapes', 'stage=c').text
    conditioning.validate_text(text)
    for field, value, message in [
        ('vocabulary', [], 'config.text.vocabulary='),
        ('tokenizer', '/no/such/folder', 'config.text.tokenizer='),
        ('hidden_state', 'first', 'config.text.hidden_state='),
    ]:
        bad = text.copy_and_resolve_references()
        with bad.ignore_type():
            bad[field] = value
        with pytest.raises(config_lib.ConfigError, match=message):
            conditioning.validate_text(bad)
    config = load_config('shapes', 'stage=b,runlocal')
    config.diffusion.prediction = 'x0'
    with pytest.raises(config_lib.ConfigError, match=r"config.diffusion.prediction='x0'.*'epsilon', 'v'"):
        validate_diffusion(config)
    config = load_config('shapes', 'runlocal')
    config.input.precomputed = '/some/records'
    with pytest.raises(config_lib.ConfigError, match='config.input.precomputed=.*only Stage C'):
        tasks.validate(config)
