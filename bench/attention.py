"""The attention kernels of `layers.Attention` (`kernels.ATTENTION_KERNELS`; `kernels.attention_kernel`
picks one per backend), measured side by side: the gradient of a Würstchen prior (the Stage C
`small` calibration model: c 256, depth 4, 8 heads, batch 8, 24x24 latents, 77 text tokens) with each kernel,
timed in turns. One JSON object, last line.

  python bench/attention.py [--steps=5]
"""

import json

import jax
import jax.numpy as jnp
from absl import app, flags

import common
from wurst_jax.models import kernels
from wurst_jax.models.stage_c import WuerstchenPrior

_STEPS = flags.DEFINE_integer('steps', 5, 'Timed rounds (each runs every kernel once).')
KERNELS = kernels.ATTENTION_KERNELS


def prior_grad(kernel: str):
    """A compiled `params -> grads` of the small prior with attention kernel `kernel`, and its params."""
    p = common.STAGE_C_MODELS['small']
    model = WuerstchenPrior(c_in=16, c=p['c'], c_cond=256, c_r=64, depth=p['depth'], num_heads=p['num_heads'])
    x = jnp.ones((p['batch'], p['side'], p['side'], 16))
    t, cond = jnp.full((p['batch'],), 0.5), jnp.ones((p['batch'], 77, 256))
    params = model.init(jax.random.key(0), x, t, cond)['params']
    grad = jax.jit(jax.grad(lambda q: jnp.mean(model.apply({'params': q}, x, t, cond) ** 2)))
    with kernels.forced_attention_kernel(kernel):  # the kernel is chosen while tracing, at the first call
        jax.block_until_ready(grad(params))
    return grad, params


def main(_):
    grads = {kernel: prior_grad(kernel) for kernel in KERNELS}
    times = common.median_times_interleaved(
        [(lambda g=g, p=p: g(p), jax.block_until_ready) for g, p in grads.values()], _STEPS.value
    )
    result = {f'{kernel}_s': round(s, 4) for kernel, s in zip(KERNELS, times)}
    result.update(
        {
            f'{kernel}_speedup': round(result['dot_product_attention_s'] / result[f'{kernel}_s'], 3)
            for kernel in KERNELS
            if kernel != 'dot_product_attention'
        }
    )
    result['chosen'] = kernels.attention_kernel()
    result.update(common.machine())
    print(json.dumps(result))


if __name__ == '__main__':
    app.run(main)
