"""Helpers for parity tests against the PyTorch references (test-only: needs torch)."""

import jax
import numpy as np
import torch

TOL = 1e-5  # max |flax - torch| / max |torch|
# PixArt-alpha/PixArt-XL-2-1024-MS scheduler/scheduler_config.json; final_sigmas_type is absent there, so
# diffusers' default 'zero' applies.
PIXART_DPM = dict(
    num_train_timesteps=1000,
    beta_start=1e-4,
    beta_end=0.02,
    beta_schedule='linear',
    algorithm_type='dpmsolver++',
    solver_order=2,
    solver_type='midpoint',
    prediction_type='epsilon',
    lower_order_final=True,
    euler_at_final=False,
    timestep_spacing='linspace',
    steps_offset=0,
    thresholding=False,
    use_karras_sigmas=False,
    lambda_min_clipped=-float('inf'),
)


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


def original_pixart_state(ref, seed: int) -> dict:
    """ref's weights under the module names of PixArt-alpha's own code (q/k/v fused, as its attention
    holds them), with its two non-weight tensors: the positions buffer and the null caption."""
    names = {
        'pos_embed.proj.': 'x_embedder.proj.',
        'adaln_single.linear.': 't_block.1.',
        'adaln_single.emb.timestep_embedder.linear_': 't_embedder.mlp.',
        'adaln_single.emb.resolution_embedder.linear_': 'csize_embedder.mlp.',
        'adaln_single.emb.aspect_ratio_embedder.linear_': 'ar_embedder.mlp.',
        'caption_projection.linear_': 'y_embedder.y_proj.fc',
        'proj_out.': 'final_layer.linear.',
        'scale_shift_table': 'final_layer.scale_shift_table',
    }
    mlp_index = {'1': '0', '2': '2'}  # nn.Sequential(Linear, SiLU, Linear)
    state, out = ref.state_dict(), {}
    for key, value in state.items():
        if key.startswith('transformer_blocks.'):
            continue
        for new, old in names.items():
            if key.startswith(new):
                rest = key[len(new) :]
                if old.endswith('mlp.'):
                    rest = mlp_index[rest[0]] + rest[1:]
                out[old + rest] = value
                break
        else:
            raise AssertionError(f'unmapped diffusers key {key}')
    for i in range(len(ref.transformer_blocks)):
        d, o = f'transformer_blocks.{i}.', f'blocks.{i}.'
        out[o + 'scale_shift_table'] = state[d + 'scale_shift_table']
        for leaf in ('weight', 'bias'):
            out[f'{o}attn.qkv.{leaf}'] = torch.cat([state[f'{d}attn1.to_{n}.{leaf}'] for n in 'qkv'])
            out[f'{o}attn.proj.{leaf}'] = state[f'{d}attn1.to_out.0.{leaf}']
            out[f'{o}cross_attn.q_linear.{leaf}'] = state[f'{d}attn2.to_q.{leaf}']
            out[f'{o}cross_attn.kv_linear.{leaf}'] = torch.cat([state[f'{d}attn2.to_{n}.{leaf}'] for n in 'kv'])
            out[f'{o}cross_attn.proj.{leaf}'] = state[f'{d}attn2.to_out.0.{leaf}']
            out[f'{o}mlp.fc1.{leaf}'] = state[f'{d}ff.net.0.proj.{leaf}']
            out[f'{o}mlp.fc2.{leaf}'] = state[f'{d}ff.net.2.{leaf}']
    out['pos_embed'] = ref.pos_embed.pos_embed.clone()  # diffusers' own positions at the base grid
    out['y_embedder.y_embedding'] = torch.randn(
        7, ref.config.caption_channels, generator=torch.Generator().manual_seed(seed)
    )
    return out
