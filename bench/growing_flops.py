"""XLA's FLOPs per train step of each arm of configs/growing.py, and the scratch budget that matches
the grown arm's total (core + grow); the grow arm's optimizer reads the core run's config.

  python bench/growing_flops.py [--root=workdirs/growing]
"""

import importlib.util
import json

import jax
from absl import app, flags

from wurst_jax import lowering, sharding

_ROOT = flags.DEFINE_string('root', 'workdirs/growing', 'Where the core run is (ROOT/core).')


def arm_config(arm: str, root: str):
    spec = importlib.util.spec_from_file_location('growing_config', 'configs/growing.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(f'arm={arm},root={root}')


def main(argv):
    del argv
    flops, steps = {}, {}
    for arm in ('core', 'grow', 'scratch'):
        config = arm_config(arm, _ROOT.value)
        config.mesh.update(data=1, fsdp=1, tensor=1)
        lowered, _ = lowering.lower_from_shapes(config, sharding.create_mesh(config.mesh, jax.devices('cpu')[:1]))
        flops[arm], steps[arm] = lowering.step_flops(config, lowered), config.total_steps
    grown_total = flops['core'] * steps['core'] + flops['grow'] * steps['grow']
    print(
        json.dumps(
            dict(
                flops_per_step=flops,
                steps=steps,
                grown_total=grown_total,
                scratch_total=flops['scratch'] * steps['scratch'],
                scratch_steps_for_equal_flops=grown_total / flops['scratch'],
            )
        )
    )


if __name__ == '__main__':
    app.run(main)
