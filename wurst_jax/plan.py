"""Ahead-of-time plan of a training run: compiles (never runs) the full train step of a config for a
mesh and global batch, and prints what one device needs: argument, output and temporary bytes
(`memory_analysis()`), FLOPs per step (`cost_analysis()`) and the compile time.

  python -m wurst_jax.plan --config=configs/stage_c.py:clip=/models/clip-bigG,effnet=/models/effnet \
      --mesh=data=1,fsdp=64,tensor=1 --batch=1280 [--topology=v5p:4x4x4] [--device_gib=95]

Without --topology the step is compiled for fake CPU devices (as many as the mesh holds): the
stand-in for a GPU mesh, as XLA's CPU and GPU backends plan buffers alike but not identically.
With --topology (v5p:4x4x4, v5e:4x4, v6e:4x4, ...) the real TPU compiler builds it on this host:
`pip install "jax[tpu]"` first; TPU_SKIP_MDS_QUERY=1 is set here, libtpu's warnings about
hostnames are harmless. Frozen networks' model folders need only their config.json: weights are
never read (`convert.shapes_only`), and a frozen text encoder's tokenizer is replaced by bytes,
which changes no shape. `--precomputed` plans the step a run on `wurst_jax.precompute`'s records
takes (Stage C: latents and frozen text states in the batch, neither Stage A nor the text encoder in
the step); no records need to exist.
"""

import json
import math
import os
import time

from absl import app, flags
from ml_collections import config_flags

from wurst_jax import config_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=False)
_MESH = flags.DEFINE_string('mesh', '', "data=D,fsdp=F,tensor=T (any subset; the config's sizes otherwise).")
_BATCH = flags.DEFINE_integer('batch', 0, "Global batch size (0: the config's input.batch_size).")
_TOPOLOGY = flags.DEFINE_string('topology', '', 'A TPU slice to compile for, e.g. v5p:4x4x4; empty: fake CPU devices.')
_DEVICE_GIB = flags.DEFINE_float(
    'device_gib', 0.0, 'Memory of one device in GiB, to say whether the step fits (0: no verdict).'
)
_PRECOMPUTED = flags.DEFINE_bool(
    'precomputed', False, "Plan the step on precomputed records (input.precomputed) instead of the config's input."
)
_OUT = flags.DEFINE_string('out', '', 'Also write the figures (bytes, FLOPs, seconds) to this JSON file.')
flags.mark_flags_as_required(['config'])

GIB = 2**30
PLANNED_RECORDS = '<planned precomputed records>'


def parse_mesh(text: str) -> dict[str, int]:
    """'data=1,fsdp=64' -> {'data': 1, 'fsdp': 64}; names must be mesh axes, sizes integers (-1 allowed)."""
    sizes = {}
    for item in filter(None, text.split(',')):
        name, _, value = item.partition('=')
        if name not in config_lib.MESH_AXES or not value.lstrip('-').isdigit():
            raise app.UsageError(
                f'--mesh={text!r}: expected comma-separated AXIS=SIZE with AXIS in '
                f'{config_lib.MESH_AXES}, e.g. data=1,fsdp=64,tensor=1'
            )
        sizes[name] = int(value)
    return sizes


def plan_config(config, mesh_sizes: dict[str, int], batch: int):
    """The config the plan compiles: mesh and batch from the flags, a bytes tokenizer for a frozen encoder."""
    config = config.copy_and_resolve_references()
    config.mesh.update(mesh_sizes)
    if batch:
        config.input.batch_size = batch
    if config.get('text') and config.text.encoder != 'train':
        config.text.tokenizer = 'bytes'
    return config


def on_precomputed_records(config) -> None:
    """Makes a validated config read precomputed records: the step then takes latents and frozen text
    states as its batch. Set after validation, as the plan needs the batch's shapes, not the records."""
    if config.model_family != 'stage_c' or config.input.aspect_buckets:
        raise app.UsageError('--precomputed: only Stage C reads precomputed records, and only without aspect buckets')
    config.input.precomputed = PLANNED_RECORDS


def plan(config, devices) -> dict[str, float]:
    """Compiles config's train step over a mesh of `devices` (real, fake or a TPU topology's) and
    returns per-device bytes of arguments, outputs, aliased outputs, temporaries and their peak,
    FLOPs per step over the whole mesh, the parameter count and the compile seconds."""
    import jax

    from wurst_jax import lowering, sharding, train

    mesh = sharding.create_mesh(config.mesh, devices)
    train.check_batch_fits_mesh(config, mesh)
    lowered, abstract_state = lowering.lower_from_shapes(config, mesh)
    t0 = time.time()
    compiled = lowered.compile()
    seconds = time.time() - t0
    memory = compiled.memory_analysis()
    figures = dict(
        devices=mesh.size,
        params=float(sum(x.size for x in jax.tree.leaves(abstract_state.params))),
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        flops=lowering.step_flops(config, lowered),
        compile_seconds=seconds,
    )
    # Donated state buffers are reused for the new state (aliased), so they count once.
    figures['peak_bytes'] = (
        figures['argument_bytes'] + figures['output_bytes'] - figures['alias_bytes'] + figures['temp_bytes']
    )
    return figures


def report(config, figures: dict[str, float], target: str, device_gib: float) -> str:
    m = config.mesh
    lines = [
        f'plan: {config.model_family}, global batch {config.input.batch_size}, mesh data={m.data} '
        f'fsdp={m.fsdp} tensor={m.tensor} on {target} ({figures["devices"]} devices), '
        f'remat {config.model.get("remat_policy", "none")}, grad_accum_steps {config.grad_accum_steps}',
        f'  params            {figures["params"] / 1e6:12.1f} M',
    ]
    for name in ('argument', 'output', 'alias', 'temp', 'peak'):
        lines.append(f'  {name + " per device":17s} {figures[name + "_bytes"] / GIB:12.2f} GiB')
    per_device = figures['flops'] / figures['devices']
    lines += [
        f'  FLOPs per step    {figures["flops"]:12.3g} (all devices; {per_device:.3g} each)',
        f'  compile time      {figures["compile_seconds"]:12.1f} s',
    ]
    if device_gib:
        fits = figures['peak_bytes'] <= device_gib * GIB
        lines.append(f'  fits in {device_gib:g} GiB:   {"yes" if fits else "NO"}')
    return '\n'.join(lines)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    config = plan_config(_CONFIG.value, parse_mesh(_MESH.value), _BATCH.value)
    from wurst_jax import tasks  # loads JAX and the families: after the flags parse

    try:
        tasks.validate(config)
    except config_lib.ConfigError as e:
        raise SystemExit(f'Invalid config: {e}') from None
    if _PRECOMPUTED.value:
        on_precomputed_records(config)
    import jax

    if _TOPOLOGY.value:
        os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
        from jax.experimental import topologies

        try:
            devices = topologies.get_topology_desc(platform='tpu', topology_name=_TOPOLOGY.value).devices
        except Exception as e:  # no libtpu, or a name it does not know
            raise SystemExit(
                f'--topology={_TOPOLOGY.value!r} could not be built ({e}); install the TPU compiler '
                'with pip install "jax[tpu]" and name a slice such as v5p:4x4x4'
            ) from None
        target = f'TPU {_TOPOLOGY.value}'
    else:
        sizes = [config.mesh[a] for a in config_lib.MESH_AXES]
        if -1 in sizes:
            raise app.UsageError(
                'without --topology give every mesh size (no -1): the plan makes that many fake CPU devices'
            )
        jax.config.update('jax_num_cpu_devices', math.prod(sizes))
        devices = jax.devices('cpu')
        target = 'fake CPU devices'
    t0 = time.time()
    figures = plan(config, devices)
    print(report(config, figures, target, _DEVICE_GIB.value))
    print(f'  wall time         {time.time() - t0:12.1f} s')
    if _OUT.value:
        with open(_OUT.value, 'w') as f:
            json.dump(dict(figures, target=target, batch=config.input.batch_size, mesh=dict(config.mesh)), f, indent=1)


if __name__ == '__main__':
    app.run(main, flags_parser=config_lib.parse_flags)
