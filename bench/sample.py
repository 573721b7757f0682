"""Three-stage sampling throughput, ours beside a loop over the diffusers models holding the same
weights, as one JSON object on the last line.

  python bench/sample.py [--batch=4] [--prior_steps=20] [--decoder_steps=12] [--prior_guidance=4] [--repeats=3]
                         [--attention_kernel=auto|blocked|einsum|dot_product_attention]

The diffusers `WuerstchenPrior` (c 256, depth 4, 8 heads: the train bench's Stage C small),
`WuerstchenDiffNeXt` and `PaellaVQModel` (the shapes Stage B decoder and Stage A VQGAN) are built
with random weights and saved; ours are `wurst_jax.convert.load_diffusers` of those folders, so both
sides hold the same weights. Both run the same chain: Stage C DDPM over `--prior_steps` linspace
steps with classifier-free guidance (the conditional and unconditional halves in one doubled batch),
Stage B DDPM over `--decoder_steps` conditioned on the prior's map, Stage A decode. Text states are
given (random), so no text encoder runs on either side. Ours is one jitted function (each chain a
`lax.scan`, `wurst_jax.diffusion.samplers`); torch is eager under inference_mode. The two sides are
called in turn, `--repeats` times each after a warm-up; `speedup` = torch time / ours (medians).
`prior_rel_err` compares one prior call of the two sides: the weights are the same.
"""

import math
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

import common
from wurst_jax import convert
from wurst_jax.diffusion import samplers, schedule
from wurst_jax.models import kernels
from wurst_jax.models.stage_a import VQGAN

_BATCH = flags.DEFINE_integer('batch', 4, 'Images per call.')
_PRIOR_STEPS = flags.DEFINE_integer('prior_steps', 20, 'Stage C steps.')
_DECODER_STEPS = flags.DEFINE_integer('decoder_steps', 12, 'Stage B steps.')
_GUIDANCE = flags.DEFINE_float('prior_guidance', 4.0, 'Stage C CFG scale (Stage B runs without).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed calls per side after one warm-up, alternating.')
_IMAGE = flags.DEFINE_integer('image_size', 128, 'Output side in pixels (Stage A latents are 1/4).')
_KERNEL = flags.DEFINE_enum(
    'attention_kernel',
    'auto',
    ('auto',) + kernels.ATTENTION_KERNELS,
    'layers.Attention kernel (auto: blocked on XLA:CPU, else dot_product_attention).',
)

PRIOR = dict(c_in=16, c=256, c_cond=256, c_r=64, depth=4, nhead=8, dropout=0.0)
LEVELS = dict(c_hidden=[64, 128], nhead=[4, 4], blocks=[2, 2], level_config=['CT', 'CTA'], inject_effnet=[True, True])
DECODER = dict(c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=64, effnet_embd=16, clip_embd=64, dropout=0.0, **LEVELS)
VQ = dict(levels=2, embed_dim=64, bottleneck_blocks=2, latent_channels=4, num_vq_embeddings=1024)
PRIOR_SIDE, TEXT_LEN = 24, 77


def torch_models(root: str) -> tuple[torch.nn.Module, ...]:
    """The three diffusers models with random weights, saved under root/{prior,decoder,vqgan}."""
    torch.manual_seed(0)
    models = WuerstchenPrior(**PRIOR), WuerstchenDiffNeXt(**DECODER), PaellaVQModel(**VQ)
    with torch.no_grad():  # keep |1 - b| of the prior's output away from 0, as a trained prior has it
        models[0].out[1].weight.mul_(0.05)
        models[0].out[1].bias.mul_(0.05)
    for name, model in zip(('prior', 'decoder', 'vqgan'), models):
        model.eval().save_pretrained(f'{root}/{name}')
    return models


def alpha_cumprod(t: float) -> float:
    """ᾱ(t) of wurst_jax.diffusion.schedule, as a Python float."""
    return float(schedule.cosine_alpha_cumprod(jnp.float32(t)))


def torch_chain(denoise, x: torch.Tensor, timesteps: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    """The DDPM chain of samplers.ddpm_step in torch (no noise on the last step)."""
    for t, t_prev in zip(timesteps[:-1], timesteps[1:]):
        a_t, a_prev = alpha_cumprod(t), alpha_cumprod(t_prev)
        eps = denoise(x, torch.full((x.shape[0],), float(t)))
        alpha = a_t / a_prev
        x = math.sqrt(1 / alpha) * (x - (1 - alpha) * eps / math.sqrt(1 - a_t))
        if t_prev > 0:
            x = x + math.sqrt((1 - alpha) * (1 - a_prev) / (1 - a_t)) * torch.randn(x.shape, generator=gen)
    return x


def torch_sampler(models, cond, uncond, clip, prior_ts, decoder_ts, guidance: float, size: int):
    prior, decoder, vqgan = models
    b = cond.shape[0]

    def prior_eps(x, t):
        eps_c, eps_u = prior(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    @torch.inference_mode()
    def generate():
        gen = torch.Generator().manual_seed(0)
        effnet = torch_chain(prior_eps, torch.randn(b, 16, PRIOR_SIDE, PRIOR_SIDE, generator=gen), prior_ts, gen)
        latents = torch_chain(
            lambda x, t: decoder(x, t, effnet, clip),
            torch.randn(b, 4, size // 4, size // 4, generator=gen),
            decoder_ts,
            gen,
        )
        return vqgan.decode(latents, force_not_quantize=True).sample

    return generate


def jax_sampler(root: str, prior_ts, decoder_ts, guidance: float, size: int):
    prior, prior_vars = convert.load_diffusers(f'{root}/prior', 'prior')
    decoder, decoder_vars = convert.load_diffusers(f'{root}/decoder', 'decoder')
    vqgan, vqgan_vars = convert.load_diffusers(f'{root}/vqgan', 'vqgan')

    @jax.jit
    def generate(prior_vars, decoder_vars, vqgan_vars, cond, uncond, clip, key):
        b = cond.shape[0]
        k_prior, k_decoder, k_x1, k_x2 = jax.random.split(key, 4)

        def prior_eps(x, t, conditional):
            c = cond if conditional else jnp.concatenate([cond, uncond])
            return prior.apply(prior_vars, x, t, c)

        x = jax.random.normal(k_x1, (b, PRIOR_SIDE, PRIOR_SIDE, 16))
        effnet = samplers.sample_guided(prior_eps, x, k_prior, prior_ts, guidance, 'ddpm')
        x = jax.random.normal(k_x2, (b, size // 4, size // 4, 4))
        latents = samplers.sample(
            lambda x, t: decoder.apply(decoder_vars, x, t, effnet, clip), x, decoder_ts, k_decoder, 'ddpm'
        )
        return vqgan.apply(vqgan_vars, latents, method=VQGAN.decode)

    def run(cond, uncond, clip):
        return generate(prior_vars, decoder_vars, vqgan_vars, cond, uncond, clip, jax.random.key(0))

    return run, (prior, prior_vars)


def main(_):
    with common.attention_kernel(_KERNEL.value):
        run()


def run():
    b, size = _BATCH.value, _IMAGE.value
    prior_ts = samplers.linspace_timesteps(_PRIOR_STEPS.value)
    decoder_ts = samplers.linspace_timesteps(_DECODER_STEPS.value)
    rng = np.random.default_rng(0)
    cond, uncond = (rng.standard_normal((b, TEXT_LEN, PRIOR['c_cond'])).astype(np.float32) for _ in range(2))
    clip = rng.standard_normal((b, TEXT_LEN, DECODER['clip_embd'])).astype(np.float32)
    root = tempfile.mkdtemp(prefix='wurst_sample_bench_')
    models = torch_models(root)
    ours, (prior, prior_vars) = jax_sampler(root, prior_ts, decoder_ts, _GUIDANCE.value, size)

    # The same weights: one prior call of each side on the same input.
    x = rng.standard_normal((b, PRIOR_SIDE, PRIOR_SIDE, 16)).astype(np.float32)
    r = np.full((b,), 0.5, np.float32)
    with torch.inference_mode():
        ref = (
            models[0](torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(r), torch.from_numpy(cond))
            .numpy()
            .transpose(0, 2, 3, 1)
        )
    mine = np.asarray(jax.jit(prior.apply)(prior_vars, x, r, cond))
    rel_err = float(np.abs(mine - ref).max() / np.abs(ref).max())

    torch_fn = torch_sampler(
        models, *(torch.from_numpy(a) for a in (cond, uncond, clip)), prior_ts, decoder_ts, _GUIDANCE.value, size
    )
    jax_fn = lambda: ours(cond, uncond, clip)
    torch_sync = lambda y: float(y.sum())
    t = time.perf_counter()
    jax.block_until_ready(jax_fn())
    jax_first = time.perf_counter() - t
    # Alternating calls, so load that comes and goes on a shared host falls on both sides alike.
    jax_s, torch_s = common.median_times_interleaved(
        [(jax_fn, jax.block_until_ready), (torch_fn, torch_sync)], _REPEATS.value, warmup=1
    )
    result = dict(
        batch=b,
        image_size=size,
        prior_steps=_PRIOR_STEPS.value,
        decoder_steps=_DECODER_STEPS.value,
        prior_guidance=_GUIDANCE.value,
        jax_s=round(jax_s, 4),
        jax_first_call_s=round(jax_first, 2),
        jax_images_per_s=round(b / jax_s, 2),
        torch_s=round(torch_s, 4),
        torch_images_per_s=round(b / torch_s, 2),
        speedup=round(torch_s / jax_s, 3),
        prior_rel_err=rel_err,
        torch_threads=torch.get_num_threads(),
        attention_kernel=kernels.attention_kernel(),
    )
    result.update(common.machine())
    common.print_result(result)


if __name__ == '__main__':
    app.run(main)
