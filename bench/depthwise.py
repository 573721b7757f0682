"""The depthwise 3x3 conv of the ResBlocks (`layers.DepthwiseConv`), forward + backward, at the shapes
of the Stage C small prior and of the shapes Stage A, timed in turns for: XLA's grouped conv, the
shifted sum with its hand-written backward (the XLA:CPU default), the same sum differentiated by JAX
(what the backward replaced), in turns, and torch's grouped Conv2d, timed before them. One JSON
object, last line.

  python bench/depthwise.py [--steps=20]
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import torch
from absl import app, flags

import common
from wurst_jax.models import kernels, layers

_STEPS = flags.DEFINE_integer('steps', 20, 'Timed rounds (each runs every kernel once).')
KINDS = ('grouped', 'shifted', 'shifted_autodiff')
SHAPES = {'stage_c_small': (8, 24, 24, 256), 'stage_a_64px': (8, 64, 64, 32), 'stage_a_32px': (8, 32, 32, 64)}


def shifted_autodiff(x, kernel):
    """The sum of shifted, channel-scaled copies, left to JAX's autodiff."""
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1] - 2, x.shape[2] - 2
    return sum(x[:, i : i + h, j : j + w, :] * kernel[i, j, 0] for i in range(3) for j in range(3))


def jax_step(kind: str, shape):
    """A jitted fwd + bwd of one kernel at `shape`, and its arguments."""
    x = jax.random.normal(jax.random.key(0), shape)
    d_out = jax.random.normal(jax.random.key(1), shape)
    module = layers.DepthwiseConv(shape[-1], 3, ((1, 1), (1, 1)))
    variables = nn.meta.unbox(module.init(jax.random.key(2), x))
    if kind == 'shifted_autodiff':
        forward = lambda v, x: shifted_autodiff(x, v['params']['kernel']) + v['params']['bias']
    else:

        def forward(v, x):
            chosen, kernels.depthwise_kernel = kernels.depthwise_kernel, lambda: kind
            try:
                return module.apply(v, x)
            finally:
                kernels.depthwise_kernel = chosen

    step = jax.jit(lambda v, x: jax.vjp(forward, v, x)[1](d_out))
    jax.block_until_ready(step(variables, x))
    return lambda: step(variables, x)


def torch_step(shape):
    b, h, w, c = shape
    conv = torch.nn.Conv2d(c, c, 3, padding=1, groups=c)
    x = torch.randn(b, c, h, w, requires_grad=True)
    d_out = torch.randn(b, c, h, w)
    return common.torch_fwd_bwd(conv, x, d_out)


def main(_):
    torch.set_num_threads(2)
    result = common.kernel_times_ms(
        SHAPES, jax_step, torch_step, ('grouped', 'shifted', 'shifted_autodiff'), _STEPS.value
    )
    result['chosen'] = kernels.depthwise_kernel()
    result.update(common.machine())
    print(json.dumps(result))


if __name__ == '__main__':
    app.run(main)
