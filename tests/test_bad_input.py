"""Bad input at every entry point (main, plan, precompute, evaluate, sample, convert, demo and the
image-folder dataset) is one clear error naming the field or file and the fix, never a traceback
from deep inside. Most checks call the function the entry point uses, in process; the few
subprocesses show that an entry point is wired to those checks."""

import os

import numpy as np
import pytest
from absl import app, flags
from ml_collections import config_flags
from PIL import Image
from safetensors.numpy import save_file

from conftest import REPO, load_config, run_module, tiny_clip_folder
from wurst_jax import config_lib, convert, defaults, demo, pipeline, tasks
from wurst_jax.convert import __main__ as convert_cli
from wurst_jax.convert import core
from wurst_jax.data import image_folder
from wurst_jax.evaluate import job

# -- Config fields: unknown, mistyped, in the file or on the command line --------------------------


@pytest.mark.parametrize(
    'arg, field, value, nearest',
    [
        ('runlocal', 'optimizer', 'lrr', 'optimizer.lr'),
        ('runlocal', '', 'total_step', 'total_steps'),
        ('stage=c,runlocal', 'model', 'num_head', 'model.num_heads'),
        ('stage=b,runlocal', 'effnet', 'dropuot', 'effnet.dropout'),
        ('runlocal', 'input', 'image_sise', 'input.image_size'),
    ],
)
def test_unknown_field_in_a_config_names_the_nearest_known_one(arg, field, value, nearest):
    config = load_config('shapes', arg)
    (config[field] if field else config)[value] = 3
    path = f'{field}.{value}' if field else value
    with pytest.raises(config_lib.ConfigError, match=rf'config\.{path}=3 .*did you mean config\.{nearest}\?'):
        tasks.validate(config)


def test_a_field_of_another_family_is_unknown_too():
    config = load_config('shapes', 'stage=c,runlocal')
    config.model.embed_dim = 16  # a Stage A field
    with pytest.raises(config_lib.ConfigError, match=r'config\.model\.embed_dim=16 .*no such field'):
        tasks.validate(config)
    config = load_config('shapes', 'stage=c,runlocal')
    config.text.encoder_config.layer_norm_eps = 1e-6  # open: any CLIPTextConfig argument
    defaults.check_known_fields(config)


def test_main_rejects_an_unknown_field_set_in_the_config_file(tmp_path):
    typo = tmp_path / 'typo.py'
    typo.write_text(
        f'import importlib.util\n'
        f'spec = importlib.util.spec_from_file_location("shapes", {str(REPO / "configs/shapes.py")!r})\n'
        'shapes = importlib.util.module_from_spec(spec)\n'
        'spec.loader.exec_module(shapes)\n\n\n'
        'def get_config():\n'
        '    config = shapes.get_config("runlocal")\n'
        '    config.optimizer.warmup_step = 10\n'
        '    return config\n'
    )
    result = run_module('wurst_jax.main', f'--config={typo}', f'--workdir={tmp_path / "run"}', timeout=120)
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    assert (
        'Invalid config: config.optimizer.warmup_step=10 is not valid: no such field: did you mean '
        'config.optimizer.warmup_steps?'
    ) in result.stderr
    assert not (tmp_path / 'run').exists()


def parse(argv: list[str]):
    """config_lib.parse_flags over argv with its own --config flag (the entry points use absl's FLAGS)."""
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file('config', None, flag_values=flag_values, sys_argv=argv)
    config_lib.parse_flags(argv, flag_values)
    return holder.value


@pytest.mark.parametrize(
    'override, message',
    [
        (
            '--config.optimizer.lrr=0.1',
            "config.optimizer.lrr='0.1' is not valid: no such field: did you mean config.optimizer.lr?",
        ),
        (
            '--config.optimiser.lr=0.1',
            "config.optimiser='0.1' is not valid: no such field: did you mean config.optimizer?",
        ),
        (
            '--config.total_steps=abc',
            "config.total_steps='abc' is not valid: a value of type int, as its 6 in the config file",
        ),
        ('--config.input.flip=maybe', "config.input.flip='maybe' is not valid: a value of type bool"),
        ('--config.optimizer.lr=1e-3x', "config.optimizer.lr='1e-3x' is not valid: a value of type float"),
    ],
)
def test_command_line_override_of_a_missing_or_mistyped_field(override, message):
    argv = ['main', f'--config={REPO / "configs/shapes.py"}:runlocal', override]
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert str(info.value).startswith(f'Invalid config: {message}')
    config = parse(
        [
            'main',
            f'--config={REPO / "configs/shapes.py"}:runlocal',
            '--config.total_steps=0x10',
            '--config.optimizer.lr',
            '0.5',
            '--noconfig.input.flip',
        ]
    )
    assert (config.total_steps, config.optimizer.lr, config.input.flip) == (16, 0.5, False)  # absl's own syntax


def test_the_eval_config_and_other_flag_errors_on_the_command_line():
    with pytest.raises(SystemExit, match=r'config\.promts=.*did you mean config\.prompts\?'):
        parse(['evaluate', f'--config={REPO / "configs/eval.py"}', '--config.promts=p.txt'])
    with pytest.raises(SystemExit, match="Invalid config: config.<arg>.stagee='a' .*known config arguments"):
        parse(['main', f'--config={REPO / "configs/shapes.py"}:stagee=a'])
    with pytest.raises(SystemExit, match="FATAL Flags parsing error: Unknown command line flag 'bogus'"):
        parse(['main', f'--config={REPO / "configs/shapes.py"}', '--bogus'])
    for overrides in ([], ['--config.seed=1']):
        with pytest.raises(SystemExit, match=r'(?s)--config=missing\.py: the config file cannot be loaded .*No such'):
            parse(['main', '--config=missing.py', *overrides])


@pytest.mark.parametrize(
    'module, args, message',
    [
        ('wurst_jax.main', ['--config.optimizer.lrr=0.1', '--workdir=unused'], 'did you mean config.optimizer.lr?'),
        ('wurst_jax.plan', ['--config.input.crop=middle'], "Invalid config: config.input.crop='middle' is not valid"),
        ('wurst_jax.precompute', [], "Invalid config: config.model_family='stage_a' is not valid: 'stage_c'"),
    ],
)
def test_entry_points_exit_with_the_config_error(module, args, message):
    result = run_module(module, '--config=configs/shapes.py:runlocal', *args, timeout=120)
    assert result.returncode != 0 and message in result.stderr and 'Traceback' not in result.stderr


def test_plan_mesh_flag_names_the_axes():
    from wurst_jax import plan

    with pytest.raises(app.UsageError, match=r"--mesh='data=1,fsdp=x'.*AXIS=SIZE"):
        plan.parse_mesh('data=1,fsdp=x')


# -- Model folders and weight files ------------------------------------------------------------------


def effnet_folder(path, weights: bytes | None):
    """A diffusers effnet folder: the runlocal Stage B effnet's config.json and `weights` (None: no file)."""
    config = load_config('shapes', 'stage=b,runlocal').effnet
    comp = core.component('effnet')
    module = comp.from_config(
        {
            'effnet': 'custom',
            'stages': [list(s) for s in config.stages],
            'c_cond': config.last_channels,
            'c_latent': config.c_latent,
        }
    )
    core.write_config(module, str(path), 'effnet')
    if weights is not None:
        (path / comp.weights_name).write_bytes(weights)
    return path


def truncated_safetensors(path) -> bytes:
    save_file({'weight': np.ones((64, 64), np.float32)}, str(path))
    data = path.read_bytes()
    return data[: len(data) // 2]


def test_model_folder_without_config_json_or_weights(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r'config\.json not found: effnet expects a diffusers model '
        r'folder with config\.json and diffusion_pytorch_model\.safetensors',
    ):
        convert.load_diffusers(str(tmp_path), 'effnet')
    with pytest.raises(FileNotFoundError, match=r'diffusion_pytorch_model\.safetensors not found'):
        convert.load_diffusers(str(effnet_folder(tmp_path / 'no_weights', None)), 'effnet')
    broken = effnet_folder(tmp_path / 'broken', b'')
    (broken / core.CONFIG_NAME).write_text('{"_class_name": "EfficientNetEncoder",')  # cut short
    with pytest.raises(ValueError, match=r'broken/config\.json is not valid JSON.*restore'):
        convert.load_diffusers(str(tmp_path / 'broken'), 'effnet')


@pytest.mark.parametrize('content', ['truncated', 'garbage'])
def test_corrupt_weights_name_the_file_for_convert_and_config_fields(tmp_path, content):
    weights = truncated_safetensors(tmp_path / 'x.safetensors') if content == 'truncated' else b'not a tensor file'
    folder = effnet_folder(tmp_path / 'effnet', weights)
    message = r'diffusion_pytorch_model\.safetensors is not a readable safetensors file .*truncated or corrupt'
    with pytest.raises(ValueError, match=message):
        convert_cli.to_flax(str(folder), str(tmp_path / 'out'), 'effnet')  # python -m wurst_jax.convert
    # effnet.source of a Stage C config reads the same folder when the task is built.
    config = load_config('shapes', 'stage=c,runlocal')
    config.effnet.source = str(folder)
    tasks.validate(config)
    with pytest.raises(ValueError, match=message):
        tasks.create(config)
    # An original checkpoint file (Stable Cascade's effnet_encoder.safetensors, a Würstchen .pt).
    (tmp_path / 'effnet_encoder.safetensors').write_bytes(weights)
    with pytest.raises(ValueError, match=r'effnet_encoder\.safetensors is not a readable safetensors file'):
        convert.load_diffusers(str(tmp_path / 'effnet_encoder.safetensors'), 'effnet')
    (tmp_path / 'model_v2_stage_b.pt').write_bytes(weights)
    with pytest.raises(ValueError, match=r'model_v2_stage_b\.pt cannot be read by torch\.load .*truncated or corrupt'):
        convert.load_diffusers(str(tmp_path / 'model_v2_stage_b.pt'), 'effnet')


def test_truncated_transformers_model_safetensors(tmp_path):
    tiny_clip_folder(tmp_path)
    weights = tmp_path / core.TRANSFORMERS_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r'model\.safetensors is not a readable safetensors file .*download or '):
        convert.load_diffusers(str(tmp_path), 'clip_text')


def test_convert_to_diffusers_needs_a_flax_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'config\.json not found: --to=diffusers reads a Flax folder'):
        convert_cli.to_diffusers(str(tmp_path), str(tmp_path / 'out'), 'effnet')
    folder = effnet_folder(tmp_path / 'flax', None)
    (folder / convert_cli.FLAX_VARIABLES).write_bytes(b'\x82\xa6params')  # cut short
    with pytest.raises(ValueError, match=r'variables\.msgpack is not readable Flax msgpack .*convert it again'):
        convert_cli.to_diffusers(str(folder), str(tmp_path / 'out'), 'effnet')


# -- Data ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    'line',
    ['{"file": "b.png", "caption": "a red circle"', '{"file": "b.png"}', '["b.png", "a red circle"]'],
    ids=['cut', 'no_caption', 'list'],
)
def test_malformed_captions_jsonl_names_file_and_line(tmp_path, line):
    for name in ('a.png', 'b.png'):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / 'captions.jsonl').write_text('{"file": "a.png", "caption": "a blue square"}\n' + line + '\n')
    with pytest.raises(ValueError) as info:
        image_folder.scan_folder(tmp_path)  # what the image_folder dataset builds from
    assert str(info.value).startswith(
        f'{tmp_path}/captions.jsonl:2: expected {{"file": ..., "caption": ...}}, got {line!r}'
    )
    (tmp_path / 'captions.jsonl').write_bytes(b'{"file": "a.png", "caption": "caf\xe9"}\n')  # Latin-1
    with pytest.raises(ValueError, match=r'captions\.jsonl is not UTF-8 text .*save it as UTF-8'):
        image_folder.scan_folder(tmp_path)


# -- Run roots: the demo's rerun, sampling, evaluation ----------------------------------------------


def test_demo_rerun_resumes_its_own_config_and_names_the_flags_for_another(demo_root):
    """The demo trained demo_root with --runlocal; a rerun with it resumes (or skips) each stage, one
    without it would restore the runlocal checkpoints into the demo-sized models: it says what to do."""
    workdir = str(demo_root / 'stage_a')
    demo.check_resumable(load_config('shapes', f'stage=a,root={demo_root},runlocal'), workdir)
    with pytest.raises(
        SystemExit,
        match=r'stage_a holds a run of another config \(.* there, .* now.*\): rerun '
        r'with the flags that started it \(--runlocal',
    ):
        demo.check_resumable(load_config('shapes', f'stage=a,root={demo_root},demo'), workdir)


def test_sampling_a_three_stage_root_without_stage_b(demo_root, tmp_path):
    os.symlink(demo_root / 'stage_c', tmp_path / 'stage_c')  # a Würstchen (three-stage) Stage C run
    with pytest.raises(
        FileNotFoundError,
        match=r'stage_b/checkpoints has no checkpoint: the run root must hold '
        r'trained stage_b/ and stage_c/',
    ):
        pipeline.check_root(str(tmp_path))  # what python -m wurst_jax.sample checks first
    pipeline.check_root(str(demo_root))


def test_evaluate_with_a_missing_workdir_or_prompts_file(demo_root, tmp_path):
    config = load_config('eval')
    config.update(workdir=str(tmp_path / 'nowhere'), prompts=str(tmp_path / 'prompts.txt'))
    with pytest.raises(config_lib.ConfigError, match=r'config\.workdir=.*nowhere.* a run root with stage_c/'):
        job.run(config)
    config.workdir = str(demo_root)
    with pytest.raises(
        config_lib.ConfigError,
        match=r"config\.prompts=.*prompts\.txt' is not valid: an existing "
        'text file',
    ):
        job.run(config)
