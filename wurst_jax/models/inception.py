"""The FID variant of Inception-v3: the 2015 TensorFlow graph as ported by pytorch-fid.

Its 2048-d pool3 output is the feature space every published FID is computed in
(Heusel et al. 2017; bioinf-jku/TTUR, mseitzer/pytorch-fid). It differs from torchvision's
Inception-v3 in its weights and in four places: average pools in Mixed_5*/6*/7b do not count the
padding, and Mixed_7c max-pools its pool branch. Module names follow torchvision's (`Mixed_6b/branch7x7_2/conv`), so the
pytorch-fid state dict converts by name (`convert/inception.py`). Inference only: batch norm
always uses its running statistics.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


class BasicConv2d(nn.Module):
    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features, self.kernel, strides=self.strides, padding=((ph, ph), (pw, pw)), use_bias=False, name='conv'
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
        return nn.relu(x)


def _avg_pool_same(x: jax.Array) -> jax.Array:
    # TensorFlow's average pool ignores the padded zeros.
    return nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(64, (1, 1), name='branch1x1')(x)
        b5 = BasicConv2d(48, (1, 1), name='branch5x5_1')(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
        b3 = BasicConv2d(64, (1, 1), name='branch3x3dbl_1')(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(384, (3, 3), strides=2, name='branch3x3')(x)
        bd = BasicConv2d(64, (1, 1), name='branch3x3dbl_1')(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
        bd = BasicConv2d(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
        return jnp.concatenate([b3, bd, _max_pool_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, (1, 1), name='branch1x1')(x)
        b7 = BasicConv2d(c7, (1, 1), name='branch7x7_1')(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
        bd = BasicConv2d(c7, (1, 1), name='branch7x7dbl_1')(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
        bp = BasicConv2d(192, (1, 1), name='branch_pool')(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(192, (1, 1), name='branch3x3_1')(x)
        b3 = BasicConv2d(320, (3, 3), strides=2, name='branch3x3_2')(b3)
        b7 = BasicConv2d(192, (1, 1), name='branch7x7x3_1')(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
        b7 = BasicConv2d(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
        return jnp.concatenate([b3, b7, _max_pool_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    max_pool_branch: bool  # True only in Mixed_7c, as in the TF graph

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(320, (1, 1), name='branch1x1')(x)
        b3 = BasicConv2d(384, (1, 1), name='branch3x3_1')(x)
        b3 = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3),
            ],
            axis=-1,
        )
        bd = BasicConv2d(448, (1, 1), name='branch3x3dbl_1')(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
        bd = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd),
            ],
            axis=-1,
        )
        if self.max_pool_branch:
            pooled = nn.max_pool(x, (3, 3), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_same(x)
        bp = BasicConv2d(192, (1, 1), name='branch_pool')(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3FID(nn.Module):
    """[N, 299, 299, 3] images in [-1, 1] -> [N, 2048] pool3 features."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = BasicConv2d(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
        x = BasicConv2d(32, (3, 3), name='Conv2d_2a_3x3')(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
        x = _max_pool_stride2(x)
        x = BasicConv2d(80, (1, 1), name='Conv2d_3b_1x1')(x)
        x = BasicConv2d(192, (3, 3), name='Conv2d_4a_3x3')(x)
        x = _max_pool_stride2(x)
        x = InceptionA(32, name='Mixed_5b')(x)
        x = InceptionA(64, name='Mixed_5c')(x)
        x = InceptionA(64, name='Mixed_5d')(x)
        x = InceptionB(name='Mixed_6a')(x)
        for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
            x = InceptionC(c7, name=name)(x)
        x = InceptionD(name='Mixed_7a')(x)
        x = InceptionE(max_pool_branch=False, name='Mixed_7b')(x)
        x = InceptionE(max_pool_branch=True, name='Mixed_7c')(x)
        return jnp.mean(x, axis=(1, 2))
