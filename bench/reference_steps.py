"""The PyTorch side of the side-by-side benchmarks: one training step of the diffusers reference
network of a stage, built from the same config with random weights (nothing is downloaded).

Each step does what ours does: noise / quantise the batch, forward, loss, backward, global-norm
clipping to `optimizer.grad_clip`, AdamW (torch's, with the config's betas and weight decay) and
an EMA update of the weights. Compute is float32, or bfloat16 autocast over float32 weights (what
our `dtype=bfloat16` is). Rematerialisation in our config turns on diffusers' gradient
checkpointing (per block), the nearest thing it has.
"""

import math
from typing import Any, Callable

import ml_collections
import torch

S = 0.008  # the cosine schedule's offset, as wurst_jax.diffusion.schedule


def device() -> torch.device:
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def sync(x: Any) -> Any:
    """Waits for the step's work: the loss value on a CPU, the stream on a GPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return float(x)


def _alpha_cumprod(t: torch.Tensor) -> torch.Tensor:
    start = math.cos(S / (1 + S) * math.pi / 2) ** 2
    return (torch.cos((t + S) / (1 + S) * math.pi / 2) ** 2 / start).clamp(1e-4, 0.9999)


def _noised(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, noise, p2 weight 1 - ᾱ), Würstchen's t sampling, as our Stage B/C tasks."""
    b = x0.shape[0]
    t = ((1 - torch.rand(b, device=x0.device)) * 1.08 + 0.001).clamp(0.001, 1.0)
    a = _alpha_cumprod(t).view(b, 1, 1, 1)
    noise = torch.randn_like(x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, noise, (1 - a).view(b)


def _trainer(
    model: torch.nn.Module,
    opt_cfg: ml_collections.ConfigDict,
    ema_decay: float,
    loss_fn: Callable[[], torch.Tensor],
    bf16: bool,
) -> Callable[[], torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=opt_cfg.lr, betas=(opt_cfg.b1, opt_cfg.b2), eps=1e-8, weight_decay=opt_cfg.weight_decay
    )
    ema = [p.detach().clone() for p in params]
    dev = params[0].device.type

    def step() -> torch.Tensor:
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if opt_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, opt_cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - ema_decay)
        return loss.detach()

    return step


def _training(model: torch.nn.Module, remat_policy: str) -> torch.nn.Module:
    """The reference in training mode on the device, with diffusers' gradient checkpointing where ours
    rematerialises."""
    model = model.to(device()).train()
    if remat_policy != 'none':
        model.enable_gradient_checkpointing()
    return model


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prior_step(
    config: ml_collections.ConfigDict, text_width: int, latent_shape: tuple[int, int, int], batch_size: int
) -> tuple[Callable[[], torch.Tensor], torch.nn.Module]:
    """diffusers WuerstchenPrior on precomputed latents [B, c_in, h, w] and text states [B, L, D]."""
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior

    m, dev = config.model, device()
    h, w, c_in = latent_shape
    prior = WuerstchenPrior(
        c_in=c_in, c=m.c, c_cond=text_width, c_r=m.c_r, depth=m.depth, nhead=m.num_heads, dropout=m.dropout
    )
    model = _training(prior, m.remat_policy)
    gen = torch.Generator(dev).manual_seed(0)
    x0 = torch.randn(batch_size, c_in, h, w, device=dev, generator=gen)
    cond = torch.randn(batch_size, config.text.max_length, text_width, device=dev, generator=gen)

    def loss_fn():
        x_t, t, noise, weight = _noised(x0)
        eps = model(x_t, t, cond)
        return (weight * ((eps.float() - noise) ** 2).mean(dim=(1, 2, 3))).mean()

    return _trainer(model, config.optimizer, config.ema_decay, loss_fn, config.dtype == 'bfloat16'), model


def pixart_step(
    config: ml_collections.ConfigDict, module_config: dict, latent_shape: tuple[int, int, int], batch_size: int
) -> tuple[Callable[[], torch.Tensor], torch.nn.Module]:
    """diffusers PixArtTransformer2DModel (`module_config`: our DiT's, as `wurst_jax.convert` writes it)
    on precomputed latents and text states, ε-prediction as our cosine-process Stage C."""
    from diffusers import PixArtTransformer2DModel

    dev = device()
    h, w, c_in = latent_shape
    model = _training(PixArtTransformer2DModel(**module_config), config.model.remat_policy)
    gen = torch.Generator(dev).manual_seed(0)
    x0 = torch.randn(batch_size, c_in, h, w, device=dev, generator=gen)
    width = module_config['caption_channels']
    cond = torch.randn(batch_size, config.text.max_length, width, device=dev, generator=gen)
    no_micro = {'resolution': None, 'aspect_ratio': None}

    def loss_fn():
        x_t, t, noise, weight = _noised(x0)
        eps = model(x_t, encoder_hidden_states=cond, timestep=t * 1000, added_cond_kwargs=no_micro).sample
        return (weight * ((eps.float() - noise) ** 2).mean(dim=(1, 2, 3))).mean()

    return _trainer(model, config.optimizer, config.ema_decay, loss_fn, config.dtype == 'bfloat16'), model


def vqgan_step(
    config: ml_collections.ConfigDict, batch_size: int
) -> tuple[Callable[[], torch.Tensor], torch.nn.Module]:
    """diffusers PaellaVQModel: encode, quantise (straight-through, β = 0.25), decode; MSE + VQ loss."""
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

    m, dev = config.model, device()
    vqgan = PaellaVQModel(
        levels=m.levels,
        embed_dim=m.embed_dim,
        bottleneck_blocks=m.bottleneck_blocks,
        latent_channels=m.latent_channels,
        num_vq_embeddings=m.num_codes,
    )
    model = _training(vqgan, 'none')
    size = config.input.image_size
    x = torch.rand(batch_size, 3, size, size, device=dev, generator=torch.Generator(dev).manual_seed(0)) * 2 - 1

    def loss_fn():
        h = model.encode(x).latents
        quantised, vq_loss, _ = model.vquantizer(h)
        recon = model.decode(quantised, force_not_quantize=True).sample
        return ((recon.float() - x) ** 2).mean() + vq_loss

    return _trainer(model, config.optimizer, config.ema_decay, loss_fn, config.dtype == 'bfloat16'), model


def decoder_step(
    config: ml_collections.ConfigDict,
    text_width: int,
    latent_shape: tuple[int, int, int],
    effnet_shape: tuple[int, int, int],
    batch_size: int,
) -> tuple[Callable[[], torch.Tensor], torch.nn.Module]:
    """diffusers WuerstchenDiffNeXt on given Stage A latents, effnet maps and text states."""
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenDiffNeXt

    m, dev = config.model, device()
    h, w, c_in = latent_shape
    levels = {f: list(m[f]) for f in ('c_hidden', 'nhead', 'blocks', 'level_config', 'inject_effnet')}
    shared = {f: m[f] for f in ('c_r', 'patch_size', 'c_cond', 'kernel_size', 'dropout')}
    decoder = WuerstchenDiffNeXt(
        c_in=c_in, c_out=c_in, effnet_embd=effnet_shape[2], clip_embd=text_width, **levels, **shared
    )
    model = _training(decoder, m.remat_policy)
    gen = torch.Generator(dev).manual_seed(0)
    x0 = torch.randn(batch_size, c_in, h, w, device=dev, generator=gen)
    effnet = torch.randn(batch_size, effnet_shape[2], effnet_shape[0], effnet_shape[1], device=dev, generator=gen)
    cond = torch.randn(batch_size, config.text.max_length, text_width, device=dev, generator=gen)

    def loss_fn():
        x_t, t, noise, weight = _noised(x0)
        eps = model(x_t, t, effnet, cond)
        return (weight * ((eps.float() - noise) ** 2).mean(dim=(1, 2, 3))).mean()

    return _trainer(model, config.optimizer, config.ema_decay, loss_fn, config.dtype == 'bfloat16'), model
