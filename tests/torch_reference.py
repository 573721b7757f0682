"""Helpers for parity tests against the PyTorch references (test-only: needs torch)."""

import jax
import numpy as np
import torch

TOL = 1e-5  # max |flax - torch| / max |torch|


def randomise(model: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter and buffer random (zero-initialised gammas/GRN/mappers would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith('num_batches_tracked') or not tensor.is_floating_point():
                continue
            if name.endswith('running_var'):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * scale)
    return model.eval()


def rel_err(ours, ref) -> float:
    ref = np.asarray(ref)
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def step_noises(rng, steps: int, shape) -> list[np.ndarray]:
    """The noise `samplers.sample` draws at each of `steps` steps from `rng`, for a reference sampler to add."""
    return [np.array(jax.random.normal(key, shape)) for key in jax.random.split(rng, steps)]


class Attention2D(torch.nn.Module):
    """The official attention (dome272/Wuerstchen modules.py, Stability-AI/StableCascade modules/common.py):
    one torch.nn.MultiheadAttention over the flattened map. Called as diffusers' AttnBlock calls its attention,
    with keys/values that already hold the map's tokens (the official `self_attn=True` concatenation)."""

    def __init__(self, c, nhead):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(c, nhead, bias=True, batch_first=True)

    def forward(self, x, encoder_hidden_states):
        b, c, h, w = x.shape
        tokens = x.view(b, c, -1).permute(0, 2, 1)
        out = self.attn(tokens, encoder_hidden_states, encoder_hidden_states, need_weights=False)[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)
