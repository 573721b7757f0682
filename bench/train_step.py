"""Times one training step of a config on this machine and prints the figures as JSON (last line).

  python bench/train_step.py --config=configs/shapes.py:stage=a [--steps=20] [--config.FIELD=VALUE]

Reports the median step time after warm-up, images/s, compile time, XLA's FLOPs per step and device, the
achieved FLOP/s and its ratio to a float32 GEMM peak measured in the same process, and peak RSS.
The side-by-side PyTorch figures of the benchmark issue are not part of this script yet.
"""
import json
import resource
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from wurst_jax import config_lib, sharding, tasks, train

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/shapes.py:stage=a', 'Config to time.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps after two warm-up steps.')


def gemm_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Median float32 matmul throughput of this process's default device, GFLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(jnp.dot)
    matmul(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def main(_):
    config = _CONFIG.value
    config_lib.validate(config)
    mesh = sharding.create_mesh(config.mesh)
    rules = config.sharding_rules
    task = tasks.create(config)
    tx = task.optimizer()
    init_fn, abstract, state_sharding = train.abstract_train_state(config, task, tx, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules)
    size, bs = config.input.image_size, config.input.batch_size
    images = np.random.default_rng(0).uniform(-1, 1, (bs, size, size, 3)).astype(np.float32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda r, x: nn.meta.unbox(init_fn(r, x)), out_shardings=state_sharding)(
            jax.random.PRNGKey(0), train.example_batch(task, 1))
        local = {'image': images}
        if task.tokenizer is not None:
            encoded = task.tokenizer(['a red circle on the left and a blue square at the top'] * bs)
            local.update(tokens=encoded['input_ids'], token_mask=encoded['attention_mask'])
        batch = sharding.make_global_batch(local, batch_sharding)
        frozen = jax.device_put(task.frozen_params(), sharding.replicated(mesh))
        lowered = train.lower_train_step(config, task, tx, mesh, abstract, state_sharding, frozen)
        t = time.perf_counter()
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t
        flops = train.step_flops(config, lowered) / mesh.size
        for _ in range(2):
            state, metrics = compiled(state, batch, frozen)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(_STEPS.value):
            t = time.perf_counter()
            state, metrics = compiled(state, batch, frozen)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    peak = gemm_peak_gflops()
    achieved = flops / step_s / 1e9
    print(json.dumps(dict(
        config=config.model_family, batch_size=bs, image_size=size, devices=mesh.size,
        jax_step_s=round(step_s, 4), images_per_s=round(bs / step_s, 2), compile_s=round(compile_s, 2),
        flops_per_step=flops, achieved_gflops=round(achieved, 2), gemm_peak_gflops=round(peak, 2),
        flop_utilisation=round(achieved / peak, 3),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))))


if __name__ == '__main__':
    app.run(main)
