"""python -m wurst_jax.convert --component=C --src=PATH --dst=PATH [--to=diffusers]

Default: a diffusers/transformers model folder, or an original checkpoint file (.pt, Stable
Cascade .safetensors), -> a Flax folder (config.json + variables.msgpack).
--to=diffusers: such a Flax folder -> a diffusers model folder that from_pretrained loads.
"""

import json
import os

from absl import app, flags
from flax import serialization

from wurst_jax import convert
from wurst_jax.convert import core

_COMPONENT = flags.DEFINE_enum('component', None, sorted(core.COMPONENTS), 'Which network.')
_SRC = flags.DEFINE_string('src', None, 'Source folder.')
_DST = flags.DEFINE_string('dst', None, 'Destination folder.')
_TO = flags.DEFINE_enum('to', 'flax', ['flax', 'diffusers'], 'Target format.')
flags.mark_flags_as_required(['component', 'src', 'dst'])
FLAX_VARIABLES = 'variables.msgpack'


def to_flax(src: str, dst: str, component: str) -> None:
    module, variables = convert.load_diffusers(src, component)
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, core.CONFIG_NAME), 'w') as f:
        json.dump(core.component(component).to_config(module), f, indent=2)
    with open(os.path.join(dst, FLAX_VARIABLES), 'wb') as f:
        f.write(serialization.msgpack_serialize(variables))


def to_diffusers(src: str, dst: str, component: str) -> None:
    config_path, variables_path = os.path.join(src, core.CONFIG_NAME), os.path.join(src, FLAX_VARIABLES)
    for needed in (config_path, variables_path):
        if not os.path.isfile(needed):
            raise FileNotFoundError(
                f'{needed} not found: --to=diffusers reads a Flax folder ({core.CONFIG_NAME} and '
                f'{FLAX_VARIABLES}) as python -m wurst_jax.convert writes it'
            )
    module = core.component(component).from_config(core.read_json(config_path))
    with open(variables_path, 'rb') as f:
        try:
            variables = serialization.msgpack_restore(f.read())
        except ValueError as e:  # msgpack's errors for truncated or foreign data
            raise ValueError(
                f'{variables_path} is not readable Flax msgpack ({e}): it is truncated or corrupt, convert it again'
            ) from None
    core.save_diffusers(module, variables, dst, component)


def main(argv):
    del argv
    convert = to_diffusers if _TO.value == 'diffusers' else to_flax
    try:
        convert(_SRC.value, _DST.value, _COMPONENT.value)
    except (FileNotFoundError, ValueError) as e:  # the input named, with the fix: no traceback needed
        raise SystemExit(f'--src={_SRC.value}: {e}') from None


if __name__ == '__main__':
    app.run(main)
