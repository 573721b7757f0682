"""XLA's FLOPs per train step of each arm of configs/growing.py, the grown model's total (core +
phase 1 + phase 2) against scratch's, and the compiled step's time in phase 1 against phase 2.

  python bench/growing_flops.py [--root=workdirs/growing] [--time_steps=5]

Phase 1's optimizer reads the depth-4 core run's config, so ROOT/core_d4 must exist; nothing else
is read. Prints one JSON line; `flops_per_step` holds `core_d2`, `core_d4`, `core_d8`, `grow`
(phase 1), `grow_phase2` and `scratch`.
"""

import importlib.util
import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from wurst_jax import lowering, sharding, tasks, train_state

_ROOT = flags.DEFINE_string('root', 'workdirs/growing', 'Where the depth-4 core run is (ROOT/core_d4).')
_TIME_STEPS = flags.DEFINE_integer('time_steps', 5, 'Compiled steps timed for phase 1 and phase 2; 0: none.')

ARMS = {
    'core_d2': 'arm=core,depth=2',
    'core_d4': 'arm=core,depth=4',
    'core_d8': 'arm=core,depth=8',
    'grow': 'arm=grow,phase=1',
    'grow_phase2': 'arm=grow,phase=2',
    'scratch': 'arm=scratch',
}


def load_growing_config():
    spec = importlib.util.spec_from_file_location('growing_config', 'configs/growing.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seconds_per_step(config, lowered, abstract_state, steps: int) -> float:
    """Median wall time of `steps` runs of the compiled step on zeros (the FLOPs do not depend on values)."""
    task = tasks.create(config)
    compiled = lowered.compile()
    state = jax.tree.map(lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding), abstract_state)
    batch = train_state.example_batch(task, config.input.batch_size)
    frozen = task.frozen_params()
    state, metrics = compiled(state, batch, frozen)  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, frozen)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv):
    del argv
    module = load_growing_config()
    flops, steps, seconds = {}, {}, {}
    mesh = None
    for name, arg in ARMS.items():
        config = module.get_config(f'{arg},root={_ROOT.value}')
        config.mesh.update(data=1, fsdp=1, tensor=1)
        mesh = mesh or sharding.create_mesh(config.mesh, jax.devices('cpu')[:1])
        lowered, abstract_state = lowering.lower_from_shapes(config, mesh)
        flops[name], steps[name] = lowering.step_flops(config, lowered), config.total_steps
        if name.startswith('grow') and _TIME_STEPS.value:
            seconds[name] = seconds_per_step(config, lowered, abstract_state, _TIME_STEPS.value)
    core = f'core_d{module.GROWN_CORE_DEPTH}'
    grown_total = sum(flops[k] * steps[k] for k in (core, 'grow', 'grow_phase2'))
    print(
        json.dumps(
            dict(
                flops_per_step=flops,
                steps=steps,
                grown_total=grown_total,
                scratch_total=flops['scratch'] * steps['scratch'],
                scratch_steps_for_equal_flops=grown_total / flops['scratch'],
                phase1_over_phase2_flops=flops['grow'] / flops['grow_phase2'],
                seconds_per_step=seconds,
            )
        )
    )


if __name__ == '__main__':
    app.run(main)
