"""The sinusoidal time embeddings against the torch references at times up to 1: Würstchen's
`gen_r_embedding` (the prior, the decoder and the pixel Shallow-UViT all use layers.gen_r_embedding)
and PixArt's `Timesteps`. At r = 1 the angles reach 1e4 rad, where one ulp of a frequency shows."""

import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDiffNeXt, WuerstchenPrior

from wurst_jax.models import layers, pixart

R = np.array([0.0, 0.01, 0.25, 0.5, 0.9, 1.0], np.float32)


def rounded_torch_exp(monkeypatch) -> list:
    """Makes torch's exp (function and method) correctly rounded, float64 then float32, and returns the
    list its results go to: torch's own float32 exp on CPU is a last bit off at about 1% of inputs."""
    results, exp = [], torch.exp

    def rounded(x):
        results.append(exp(x.double()).float())
        return results[-1]

    monkeypatch.setattr(torch, 'exp', rounded)
    monkeypatch.setattr(torch.Tensor, 'exp', rounded)
    return results


@pytest.mark.parametrize('reference', [WuerstchenPrior, WuerstchenDiffNeXt], ids=['prior', 'decoder'])
@pytest.mark.parametrize('c_r', [64, 16, 15])  # 15: the odd width is zero-padded
def test_r_embedding_matches_diffusers(monkeypatch, reference, c_r):
    ours = np.asarray(layers.gen_r_embedding(jnp.asarray(R), c_r))
    embed = lambda: reference.gen_r_embedding(types.SimpleNamespace(c_r=c_r), torch.from_numpy(R)).numpy()
    # torch's own exp: at c_r 64 one of its 32 frequencies (the 25th) is a last bit off, which moves that
    # float32 angle (~8 rad at r = 1) by up to two ulps, 9.5e-7.
    np.testing.assert_allclose(ours, embed(), rtol=0, atol=1e-6)
    with monkeypatch.context() as patch:
        rounded_torch_exp(patch)
        np.testing.assert_allclose(ours, embed(), rtol=0, atol=2e-7)


def test_pixart_timestep_embedding_matches_diffusers(monkeypatch):
    t = 1000 * R  # Stage C passes PixArt 1000 · r
    ours = np.asarray(pixart.timestep_embedding(jnp.asarray(t)))
    embed = lambda shift=0: get_timestep_embedding(
        torch.from_numpy(t), 256, flip_sin_to_cos=True, downscale_freq_shift=shift
    ).numpy()
    # torch's own exp is a last bit off at two of the 128 frequencies (the 13th and the 107th): at t = 1000
    # the 13th angle (~420 rad, where a float32 ulp is 3e-5) moves by about one ulp.
    np.testing.assert_allclose(ours, embed(), rtol=0, atol=5e-5)
    with monkeypatch.context() as patch:
        frequencies = rounded_torch_exp(patch)
        np.testing.assert_allclose(ours, embed(), rtol=0, atol=2e-7)
        for shift in (0, 1):  # 1: DiT's Timesteps, which convert/dit.py evaluates
            embed(shift)
            np.testing.assert_array_equal(pixart.sinusoid_frequencies(256, shift), frequencies[-1].numpy())
