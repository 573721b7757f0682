"""VGG16 convolutional features (torchvision's `vgg16().features` layout) for a perceptual loss."""

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision's VGG16 'D' layout: conv widths, 'M' = 2x2 max-pool. Conv i sits at features.<index>.
LAYOUT = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
# LPIPS reads the ReLU outputs after these convs (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
TAPS = (3, 8, 15, 22, 29)
# LPIPS's input scaling for images in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def torch_indices() -> list[int]:
    """Index of each conv in torchvision's `features` Sequential (conv, ReLU, [pool] ...)."""
    indices, i = [], 0
    for item in LAYOUT:
        if item == 'M':
            i += 1
        else:
            indices.append(i)
            i += 2
    return indices


class VGG16Features(nn.Module):
    """x [B, H, W, 3] in [-1, 1] -> the five LPIPS feature maps."""

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        x = (x - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
        taps, index = [], 0
        for item in LAYOUT:
            if item == 'M':
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                index += 1
                continue
            x = nn.relu(nn.Conv(item, (3, 3), padding=((1, 1), (1, 1)), name=f'features_{index}')(x))
            if index + 1 in TAPS:
                taps.append(x)
            index += 2
        return taps


def perceptual_distance(features_a: list[jax.Array], features_b: list[jax.Array]) -> jax.Array:
    """LPIPS-style distance with uniform channel weights: per image, summed over the taps: [B]."""

    def unit(f):
        return f / (jnp.sqrt(jnp.sum(f**2, axis=-1, keepdims=True)) + 1e-10)

    return sum(
        jnp.mean(jnp.sum((unit(a) - unit(b)) ** 2, axis=-1), axis=(1, 2)) for a, b in zip(features_a, features_b)
    )
