"""python -m wurst_jax.convert --component=C --src=PATH --dst=PATH [--to=diffusers]

Default: a diffusers/transformers model folder, or an original checkpoint file (.pt, Stable
Cascade .safetensors), -> a Flax folder (config.json + variables.msgpack).
--to=diffusers: such a Flax folder -> a diffusers model folder that from_pretrained loads.
"""
import json
import os

from absl import app, flags
from flax import serialization

from wurst_jax.convert import core

_COMPONENT = flags.DEFINE_enum('component', None, sorted(core.COMPONENTS), 'Which network.')
_SRC = flags.DEFINE_string('src', None, 'Source folder.')
_DST = flags.DEFINE_string('dst', None, 'Destination folder.')
_TO = flags.DEFINE_enum('to', 'flax', ['flax', 'diffusers'], 'Target format.')
flags.mark_flags_as_required(['component', 'src', 'dst'])
FLAX_VARIABLES = 'variables.msgpack'


def to_flax(src: str, dst: str, component: str) -> None:
    module, variables = core.load_diffusers(src, component)
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, core.CONFIG_NAME), 'w') as f:
        json.dump(core.component(component).to_config(module), f, indent=2)
    with open(os.path.join(dst, FLAX_VARIABLES), 'wb') as f:
        f.write(serialization.msgpack_serialize(variables))


def to_diffusers(src: str, dst: str, component: str) -> None:
    with open(os.path.join(src, core.CONFIG_NAME)) as f:
        module = core.component(component).from_config(json.load(f))
    with open(os.path.join(src, FLAX_VARIABLES), 'rb') as f:
        variables = serialization.msgpack_restore(f.read())
    core.save_diffusers(module, variables, dst, component)


def main(argv):
    del argv
    convert = to_diffusers if _TO.value == 'diffusers' else to_flax
    convert(_SRC.value, _DST.value, _COMPONENT.value)


if __name__ == '__main__':
    app.run(main)
