"""Config helpers: the short-string config argument, shared defaults, and validation.

A config file under configs/ is the whole experiment; these helpers keep the shared parts in one
place. `validate` runs before anything is built or compiled, so a bad value fails in seconds with
the field, the value and what is allowed.
"""

import difflib
import importlib.util
import re
from typing import Any

import ml_collections
from absl import flags

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis name -> mesh axes. Data parallel over data x fsdp; parameters split along fsdp;
# hidden/head widths along tensor.
DEFAULT_SHARDING_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('conv_out', 'fsdp'),
    ('conv_in', None),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('vocab', None),
)


class ConfigError(ValueError):
    """A config value that is not allowed; the message names the field, the value and the fix."""

    def __init__(self, field: str, value: Any, allowed: str):
        super().__init__(f'config.{field}={value!r} is not valid: {allowed}')
        self.field = field


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses 'key=value,flag' (big_vision style) into a ConfigDict typed by the defaults."""
    parsed = ml_collections.ConfigDict(dict(defaults))
    for item in filter(None, (arg or '').split(',')):
        key, _, value = item.partition('=')
        if key not in defaults:
            raise ConfigError(f'<arg>.{key}', value, f'known config arguments are {sorted(defaults)}')
        default = defaults[key]
        if isinstance(default, bool):
            parsed[key] = value.lower() in ('', '1', 'true', 'yes')
        elif value == '':
            raise ConfigError(f'<arg>.{key}', value, 'give a value, e.g. key=value')
        else:
            parsed[key] = type(default)(value)
    return parsed


def split_arg(arg: str | None, keys) -> tuple[str, str]:
    """('key=value,...' items whose key is in `keys`, the other items): a config's own argument apart from
    the one it passes on to the config file it builds on."""
    items = [item for item in (arg or '').split(',') if item]
    ours = [item for item in items if item.partition('=')[0] in keys]
    return ','.join(ours), ','.join(item for item in items if item not in ours)


def base_config() -> ml_collections.ConfigDict:
    """Fields every experiment has: seed, mesh, sharding, precision, logging, checkpoints."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 1000
    # Mesh shape per axis; exactly one -1 takes the remaining devices.
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.sharding_rules = DEFAULT_SHARDING_RULES
    # Compute dtype; parameters and optimizer state stay float32.
    config.dtype = 'float32'
    config.ema_decay = 0.999
    # Micro-batches per step: gradients are averaged over them, activations are those of one.
    config.grad_accum_steps = 1
    # A long run's intervals (the full-size recipes'); short experiments set their own.
    config.log_every_steps = 100
    config.checkpoint_every_steps = 2000
    config.keep_checkpoints = 3
    config.image_every_steps = 5000
    config.eval_every_steps = 10_000  # 0: evaluate only at the end of training
    # Low-rank adapters on a frozen base (`wurst_jax.lora`); rank 0 trains the networks themselves.
    # targets: comma-separated preset names (lora.PRESETS) or regular expressions over param paths;
    # base: the trained run (workdir) whose EMA weights are the base, '' for the family's init (e.g. init.prior);
    # init_from: a LoRA file (peft-style keys, as wurst_jax.export writes) the adapters start from.
    config.lora = ml_collections.ConfigDict(
        dict(rank=0, alpha=8.0, dropout=0.0, targets='attention', base='', base_dtype='float32', init_from='')
    )
    config.max_nonfinite_steps = 20  # stop after this many skipped (non-finite) steps in a row
    config.record_batch_ids = False  # write each step's example ids to workdir/batch_ids.txt
    config.profile = ml_collections.ConfigDict(dict(first_step=10, num_steps=0))  # 0 steps: off
    return config


MESH_PRESETS = ('dp', 'fsdp', 'fsdp_tp')


def mesh_preset(name: str, tensor: int = 1) -> ml_collections.ConfigDict:
    """Mesh sizes of a parallelism preset over all devices: 'dp' replicates params and splits the
    batch; 'fsdp' also splits params and optimizer state (the `embed`/`conv_out` dims, by the default
    rules); 'fsdp_tp' adds `tensor`-way tensor parallelism of attention heads and MLPs."""
    if name not in MESH_PRESETS:
        raise ConfigError('<arg>.sharding', name, f'one of {MESH_PRESETS}')
    if (name == 'fsdp_tp') != (tensor > 1):
        raise ConfigError('<arg>.tensor', tensor, "> 1 with sharding='fsdp_tp' and 1 otherwise")
    if name == 'dp':
        return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    return ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=tensor))


def optimizer_config(
    lr: float,
    *,
    warmup_steps: int = 0,
    schedule: str = 'cosine',
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> ml_collections.ConfigDict:
    """AdamW with warm-up then a cosine or constant schedule, and global-norm clipping."""
    return ml_collections.ConfigDict(
        dict(
            lr=lr,
            warmup_steps=warmup_steps,
            schedule=schedule,
            weight_decay=weight_decay,
            grad_clip=grad_clip,
            b1=b1,
            b2=b2,
            eps=eps,
        )
    )


def word_text_config(vocabulary, *, width: int, layers: int, architecture: str = 'clip') -> ml_collections.ConfigDict:
    """A small text encoder trained with the stage over a closed vocabulary of words
    (`tokenizer='words'`), CLIP's architecture or T5's (gated-GELU, as T5 v1.1), with per-sample
    caption dropout for classifier-free guidance."""
    if architecture == 't5':
        encoder = dict(d_model=width, d_kv=width // 4, d_ff=2 * width, num_layers=layers, num_heads=4)
    else:
        encoder = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, hidden_act='gelu')
        encoder.update(num_attention_heads=4)
    return ml_collections.ConfigDict(
        dict(
            architecture=architecture,
            tokenizer='words',
            vocabulary=vocabulary,
            max_length=16,
            encoder='train',
            hidden_state='last',
            dropout=0.1,
            dropout_mode='sample',
            encoder_config=ml_collections.ConfigDict(encoder),
        )
    )


def input_config(
    dataset: str, *, image_size: int, batch_size: int, crop: str = 'center', flip: bool = False, resize: int = 0
) -> ml_collections.ConfigDict:
    """The input pipeline fields read by wurst_jax.data.input_pipeline."""
    return ml_collections.ConfigDict(
        dict(
            dataset=dataset,
            data_dir='data',
            folder='',
            train_split='train',
            eval_split='test',
            # hold_out: a colour no scene draws; only: a colour every scene names ('' for neither).
            shapes=ml_collections.ConfigDict(dict(num_train=20000, num_test=512, seed=0, hold_out='', only='')),
            image_size=image_size,
            resize=resize,
            crop=crop,
            flip=flip,
            batch_size=batch_size,
            num_workers=0,
            precomputed='',
            aspect_buckets=False,
            bucket_multiple=0,
        )
    )


def unknown_field_error(path: str, value: Any, known: tuple[str, ...]) -> ConfigError:
    """The ConfigError for `path`, which is none of the `known` fields of its section: it names the nearest."""
    *section, name = path.split('.')
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = (
        f'did you mean config.{".".join([*section, close[0]])}?' if close else f'the fields there are {sorted(known)}'
    )
    return ConfigError(path, value, f'no such field: {hint}')


# ----------------------------------------------------------------------------------------------
# The --config flag of the entry points: overrides of missing fields or with values of the wrong type.

_OVERRIDE = re.compile(r'^--?(?:no)?(\w+)\.([\w.]+)(?:=(.*))?$', re.DOTALL)
_BOOL_WORDS = frozenset({'true', 't', '1', 'false', 'f', '0'})  # absl's, any case


def load_config_file(spec: str) -> Any:
    """The config of 'PATH[:ARG]' as --config=PATH[:ARG] loads it (get_config(ARG))."""
    path, *arg = spec.split(':', 1)
    module_spec = importlib.util.spec_from_file_location('config_file', path)
    if module_spec is None or not path.endswith('.py'):
        raise FileNotFoundError(f'--config={spec}: {path} is not a Python config file')
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(*arg)


def check_override(config, path: str, value: str | None) -> None:
    """ConfigError unless --config.PATH=VALUE names a field of `config` and VALUE parses as its type."""
    node, parts = config, path.split('.')
    for i, part in enumerate(parts):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            keys = tuple(node) if isinstance(node, (ml_collections.ConfigDict, dict)) else ()
            raise unknown_field_error('.'.join(parts[: i + 1]), value, keys)
        node = node[part]
    kind = type(node)
    if kind is bool:
        ok = value is None or value.lower() in _BOOL_WORDS
    elif kind in (int, float):
        try:
            int(value, 0) if kind is int else float(value)
            ok = True
        except (TypeError, ValueError):
            ok = False
    else:
        ok = True
    if not ok:
        raise ConfigError(path, value, f'a value of type {kind.__name__}, as its {node!r} in the config file')


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """absl `flags_parser` of the entry points with a --config flag (app.run(main, flags_parser=...)):
    a --config.F=V override that names no field of the config, or whose value does not parse as the
    field's type, exits with the ConfigError that names it (and the nearest field) instead of a traceback."""
    try:
        args = flag_values(argv)
        flag_values['config'].value.get
        return args
    except OSError as e:
        raise SystemExit(f'--config={_flag_value(argv, "config")}: the config file cannot be loaded ({e})') from None
    except (AttributeError, KeyError, flags.Error) as error:
        spec = _flag_value(argv, 'config') or flag_values['config'].default  # a path, or the parsed default
        try:
            config = load_config_file(spec) if isinstance(spec, str) else spec
            for i, arg in enumerate(argv[1:], start=1):
                match = _OVERRIDE.match(arg)
                if match and match.group(1) == 'config':
                    value = match.group(3)
                    if value is None and i + 1 < len(argv) and not argv[i + 1].startswith('-'):
                        value = argv[i + 1]  # --config.F V
                    check_override(config, match.group(2), value)
        except ConfigError as e:
            raise SystemExit(f'Invalid config: {e}') from None
        if isinstance(error, flags.Error):
            raise SystemExit(f'FATAL Flags parsing error: {error}') from None
        raise


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of --NAME=V or --NAME V in argv, the last one given."""
    value = None
    for i, arg in enumerate(argv):
        if re.match(rf'^--?{name}=', arg):
            value = arg.split('=', 1)[1]
        elif re.match(rf'^--?{name}$', arg) and i + 1 < len(argv):
            value = argv[i + 1]
    return value


# ----------------------------------------------------------------------------------------------
# Validation.


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(field, value, allowed)


def _positive_int(config, field: str) -> None:
    value = config
    for part in field.split('.'):
        value = value[part]
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, field, value, 'a positive integer')


def _validate_mesh(config) -> None:
    sizes = dict(config.mesh)
    _check(set(sizes) == set(MESH_AXES), 'mesh', sizes, f'exactly the axes {MESH_AXES}')
    for axis, size in sizes.items():
        _check(
            isinstance(size, int) and (size >= 1 or size == -1),
            f'mesh.{axis}',
            size,
            'a positive integer, or -1 to take the remaining devices',
        )
    _check(list(sizes.values()).count(-1) <= 1, 'mesh', sizes, 'at most one axis may be -1')
    logical = [rule[0] for rule in config.sharding_rules]
    for name, target in config.sharding_rules:
        targets = target if isinstance(target, (tuple, list)) else (target,)
        for axis in targets:
            _check(
                axis is None or axis in MESH_AXES,
                f'sharding_rules[{name!r}]',
                target,
                f'mesh axes from {MESH_AXES} or None',
            )
    _check(len(set(logical)) == len(logical), 'sharding_rules', logical, 'each logical name once')


def validate_optimizer(config, field: str) -> None:
    opt = config[field]
    _check(opt.lr > 0, f'{field}.lr', opt.lr, 'a positive learning rate')
    _check(opt.schedule in ('cosine', 'constant'), f'{field}.schedule', opt.schedule, "one of 'cosine', 'constant'")
    _check(
        isinstance(opt.warmup_steps, int) and 0 <= opt.warmup_steps <= config.total_steps,
        f'{field}.warmup_steps',
        opt.warmup_steps,
        f'an integer in [0, total_steps={config.total_steps}]',
    )
    _check(opt.grad_clip >= 0, f'{field}.grad_clip', opt.grad_clip, 'a norm >= 0 (0 disables clipping)')
    _check(opt.weight_decay >= 0, f'{field}.weight_decay', opt.weight_decay, 'a value >= 0')
    for beta in ('b1', 'b2'):
        _check(0 <= opt[beta] < 1, f'{field}.{beta}', opt[beta], 'a value in [0, 1)')
    _check(opt.eps > 0, f'{field}.eps', opt.eps, "a positive number (Adam's ε)")


def _validate_input(config) -> None:
    inp = config.input
    _check(
        isinstance(inp.dataset, str) and inp.dataset != '',
        'input.dataset',
        inp.dataset,
        "'shapes', 'photos', 'image_folder' or the name of a prepared TFDS dataset",
    )
    _check(
        inp.dataset != 'image_folder' or bool(inp.folder),
        'input.folder',
        inp.folder,
        "the path of the image folder when input.dataset='image_folder'",
    )
    for field in ('input.image_size', 'input.batch_size'):
        _positive_int(config, field)
    _check(inp.image_size % 4 == 0, 'input.image_size', inp.image_size, 'a multiple of 4 (Stage A is f4)')
    _check(
        isinstance(inp.resize, int) and inp.resize >= 0,
        'input.resize',
        inp.resize,
        'a shorter-side size >= 0 (0: resize to image_size)',
    )
    _check(
        inp.resize == 0 or inp.resize >= inp.image_size,
        'input.resize',
        inp.resize,
        f'0 or at least input.image_size={inp.image_size}, since the crop is taken after resizing',
    )
    _check(inp.crop in ('center', 'random'), 'input.crop', inp.crop, "one of 'center', 'random'")
    _check(
        isinstance(inp.aspect_buckets, bool),
        'input.aspect_buckets',
        inp.aspect_buckets,
        'True (a batch per multi-aspect bucket, PixArt-α) or False',
    )
    multiple = inp.bucket_multiple
    _check(
        isinstance(multiple, int) and multiple >= 0,
        'input.bucket_multiple',
        multiple,
        '0 (image_size / 16) or the positive multiple that bucket sides are rounded to',
    )
    _check(
        not inp.aspect_buckets or config.model_family == 'stage_c',
        'input.aspect_buckets',
        True,
        'False except for Stage C (the other stages train on square crops)',
    )
    _check(
        isinstance(inp.num_workers, int) and inp.num_workers >= 0,
        'input.num_workers',
        inp.num_workers,
        'an integer >= 0',
    )
    _check(
        not inp.precomputed or config.model_family == 'stage_c',
        'input.precomputed',
        inp.precomputed,
        "'' for this model family: only Stage C reads precomputed records",
    )


def _validate_eval(config) -> None:
    ev = config.eval
    _check(
        ev.data in ('split', 'astronaut_tiles'),
        'eval.data',
        ev.data,
        "'split' (input.eval_split of the dataset) or 'astronaut_tiles' (the held-out photo)",
    )
    for field in ('eval.num_examples', 'eval.batch_size', 'eval.num_grid_images', 'eval.grid_columns'):
        _positive_int(config, field)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first invalid field every experiment has (`tasks.validate` adds the
    family's own: call that before building anything)."""
    for field in ('total_steps', 'log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'image_every_steps'):
        _positive_int(config, field)
    _check(isinstance(config.seed, int), 'seed', config.seed, 'an integer')
    _check(
        isinstance(config.eval_every_steps, int) and config.eval_every_steps >= 0,
        'eval_every_steps',
        config.eval_every_steps,
        'an integer >= 0 (0: evaluate at the end only)',
    )
    _positive_int(config, 'max_nonfinite_steps')
    _positive_int(config, 'grad_accum_steps')
    _check(config.dtype in ('float32', 'bfloat16'), 'dtype', config.dtype, "one of 'float32', 'bfloat16'")
    _check(0 <= config.ema_decay < 1, 'ema_decay', config.ema_decay, 'a value in [0, 1)')
    _check(
        config.profile.num_steps >= 0,
        'profile.num_steps',
        config.profile.num_steps,
        'an integer >= 0 (0 disables profiling)',
    )
    _validate_mesh(config)
    _validate_input(config)
    _validate_eval(config)
    validate_optimizer(config, 'optimizer')
