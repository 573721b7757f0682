"""The VQGAN decoder's 4x4 stride-2 transposed conv (`layers.ConvTranspose`), forward + backward, at the
shapes of the shapes Stage A's upsampling and of an f4 VQGAN at 256 px, timed in turns for: lax's
transposed conv and the 3x3 conv to the four output phases with depth-to-space (the XLA:CPU default),
and torch's ConvTranspose2d, timed before them. One JSON object, last line.

  python bench/conv_transpose.py [--steps=20]
"""

import json

import flax.linen as nn
import jax
import torch
from absl import app, flags

import common
from wurst_jax.models import kernels, layers

_STEPS = flags.DEFINE_integer('steps', 20, 'Timed rounds (each runs every kernel once).')
# (batch, height, width, in channels, out channels): the input of the transposed conv
SHAPES = {'stage_a_small': (8, 16, 16, 64, 32), 'vqgan_f4_256px': (4, 64, 64, 128, 64)}


def jax_step(kind: str, shape):
    """A jitted fwd + bwd of one kernel at `shape`, and its arguments."""
    b, h, w, c, o = shape
    x = jax.random.normal(jax.random.key(0), (b, h, w, c))
    d_out = jax.random.normal(jax.random.key(1), (b, 2 * h, 2 * w, o))
    module = layers.conv_transpose(o, (4, 4), strides=2, torch_padding=1)
    variables = nn.meta.unbox(module.init(jax.random.key(2), x))

    def forward(v, x):
        chosen, kernels.conv_transpose_kernel = kernels.conv_transpose_kernel, lambda: kind
        try:
            return module.apply(v, x)
        finally:
            kernels.conv_transpose_kernel = chosen

    step = jax.jit(lambda v, x: jax.vjp(forward, v, x)[1](d_out))
    jax.block_until_ready(step(variables, x))
    return lambda: step(variables, x)


def torch_step(shape):
    b, h, w, c, o = shape
    conv = torch.nn.ConvTranspose2d(c, o, 4, stride=2, padding=1)
    x = torch.randn(b, c, h, w, requires_grad=True)
    d_out = torch.randn(b, o, 2 * h, 2 * w)
    return common.torch_fwd_bwd(conv, x, d_out)


def main(_):
    torch.set_num_threads(2)
    result = common.kernel_times_ms(SHAPES, jax_step, torch_step, ('lax', 'phases'), _STEPS.value)
    result['chosen'] = kernels.conv_transpose_kernel()
    result.update(common.machine())
    print(json.dumps(result))


if __name__ == '__main__':
    app.run(main)
