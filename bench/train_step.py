"""Times one training step, ours beside the diffusers PyTorch reference, and prints the figures as
one JSON object on the last line.

  python bench/train_step.py --stage=c --size=small              # the calibration model, float32
  python bench/train_step.py --stage={a,b,c,pixart} --size={tiny,small} [--steps=20] [--torch=false]
                             [--attention_kernel=auto|blocked|cudnn|einsum|dot_product_attention]
  python bench/train_step.py --stage=c --size=full --dtype=bfloat16 --batch=32 --attention_kernel=cudnn   # a GPU
  python bench/train_step.py --config=configs/shapes.py:stage=a [--config.FIELD=VALUE]   # any config, ours only

`--stage/--size` name presets (bench/common.py): Stage C is configs/stage_c.py on precomputed
latents and text states (tiny: c 64, small: c 256 depth 4 8 heads batch 8 at 24x24 with 77x256
conditioning, full: the config's 1B prior), PixArt the same with PixArt-α's DiT of that size (2x2
patches), Stage A and B are configs/shapes.py (`runlocal` for tiny). `--set=FIELD=VALUE` changes a
preset's field (`--set=model.remat_policy=none`).

Ours: `wurst_jax.lowering.lower_train_step` of the config, compiled once, median of `--steps` after
warm-up. The reference: the same network in diffusers (WuerstchenPrior, WuerstchenDiffNeXt,
PixArtTransformer2DModel, PaellaVQModel) with the same config, batch, AdamW, clipping, EMA and
dtype (reference_steps.py), timed in the same process just before ours (its memory freed first), or
alternating with ours step by step with `--interleave` (see the flag for the OpenMP caveat).
`speedup` = torch step / our step; `flop_utilisation` = XLA's model FLOPs per step
(`lowering.step_flops`) / our step / the matmul peak measured in this process for the compute dtype.
On a GPU `mfu` is against the H100's dense bf16 peak, 989 TFLOP/s.

Stage B trains the decoder alone on given Stage A latents, effnet maps and text states on both sides
(bench/decoder_only.py): what WuerstchenDiffNeXt is given, not the whole step of configs/shapes.py,
which also encodes the images and trains the effnet and the text encoder (`--config=` times that).
"""

import contextlib
import gc
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import common
import decoder_only
from wurst_jax import convert, lowering, sharding, tasks, train_state
from wurst_jax.models import kernels
from wurst_jax.models.layers import DTYPES

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A config to time (ours only); else --stage/--size.')
_STAGE = flags.DEFINE_enum('stage', 'c', common.STAGES, 'Preset stage.')
_SIZE = flags.DEFINE_enum('size', 'small', common.SIZES, 'Preset size (full: Stage C only).')
_BATCH = flags.DEFINE_integer('batch', 0, "Global batch size (0: the preset's).")
_DTYPE = flags.DEFINE_enum('dtype', '', ['', 'float32', 'bfloat16'], "Compute dtype (empty: the preset's).")
_SET = flags.DEFINE_multi_string('set', [], 'FIELD=VALUE changes to the preset config.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps after warm-up, each side.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps first, each side.')
_TORCH = flags.DEFINE_bool('torch', True, 'Also time the diffusers reference (presets only).')
_DEPTHWISE = flags.DEFINE_enum(
    'depthwise',
    'auto',
    ['auto', 'shifted', 'grouped'],
    'layers.DepthwiseConv kernel (auto: a sum of shifted copies on XLA:CPU, else grouped).',
)
_INTERLEAVE = flags.DEFINE_bool(
    'interleave',
    False,
    'Alternate our step and the reference step in one timing '
    "loop. On a CPU, run with OMP_WAIT_POLICY=PASSIVE: torch's spinning OpenMP "
    'threads otherwise make each torch step after a JAX step seconds slower.',
)
_PROFILE = flags.DEFINE_string(
    'profile_dir',
    '',
    'If set, trace 3 more steps of ours there (jax.profiler, '
    'with a Perfetto file) and report the ops that took longest.',
)
_KERNEL = flags.DEFINE_enum(
    'attention_kernel',
    'auto',
    ('auto',) + kernels.ATTENTION_KERNELS,
    'layers.Attention kernel (auto: blocked on XLA:CPU, cudnn on a GPU in bfloat16, else dot_product_attention).',
)

H100_DENSE_BF16_TFLOPS = 989.0


def progress(message: str) -> None:
    print(f'[bench {time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


def build_config():
    """(config, whether it is a preset). A Stage C preset trains on precomputed inputs: the flag is
    set after validation, which would otherwise look for the record files."""
    if _CONFIG.value is not None:
        config = _CONFIG.value
        tasks.validate(config)
        return config, False
    config = common.preset_config(_STAGE.value, _SIZE.value)
    if _BATCH.value:
        config.input.batch_size = _BATCH.value
    if _DTYPE.value:
        config.dtype = _DTYPE.value
    common.apply_overrides(config, _SET.value)
    tasks.validate(config)
    if config.model_family == 'stage_c':
        config.input.precomputed = 'bench: precomputed latents and text states'
    return config, True


def materialise(tree, seed: int = 0):
    """Random arrays for ShapeDtypeStructs (frozen networks read from config-only folders): small
    normals, ones for variances, so the frozen networks compute finite, non-trivial values."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for (path, leaf), key in zip(leaves, keys):
        if 'var' in jax.tree_util.keystr(path):
            out.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            out.append((0.02 * jax.random.normal(key, leaf.shape, jnp.float32)).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def random_batch(task, batch_size: int) -> dict[str, np.ndarray]:
    """A batch shaped like the task's: images in [-1, 1], normal latents / text states, tokens of a caption."""
    rng = np.random.default_rng(0)
    batch = {}
    for key, (shape, dtype) in task.batch_spec().items():
        if key == 'image':
            batch[key] = rng.uniform(-1, 1, (batch_size, *shape)).astype(np.float32)
        elif key in ('tokens', 'token_mask'):
            continue
        else:
            batch[key] = rng.standard_normal((batch_size, *shape)).astype(np.dtype(dtype))
    if 'tokens' in task.batch_spec():
        encoded = task.tokenizer(['a red circle on the left and a blue square at the top'] * batch_size)
        batch.update(tokens=np.asarray(encoded['input_ids']), token_mask=np.asarray(encoded['attention_mask']))
    return batch


def build_reference(config, task):
    """(step, model): the diffusers step of the config's network (reference_steps.py)."""
    import reference_steps

    bs = config.input.batch_size
    if config.model_family == 'stage_c' and config.model.backbone == 'pixart':
        module_config = convert.core.component('pixart').to_config(task.prior)
        return reference_steps.pixart_step(config, module_config, task.latent_shape(), bs)
    if config.model_family == 'stage_c':
        return reference_steps.prior_step(config, task.text.width, task.latent_shape(), bs)
    if config.model_family == 'stage_a':
        return reference_steps.vqgan_step(config, bs)
    return reference_steps.decoder_step(config, task.text_shape[1], task.latent_shape, task.effnet_shape, bs)


def reference_info(model) -> dict:
    import reference_steps
    import torch

    info = dict(
        torch_params=reference_steps.param_count(model), torch_threads=torch.get_num_threads(), torch=torch.__version__
    )
    if torch.cuda.is_available():
        info['torch_peak_gib'] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return info


def time_reference(config, task) -> dict:
    """The diffusers step of the config's network, timed alone; its memory is freed before ours runs."""
    import reference_steps
    import torch

    step, model = build_reference(config, task)
    try:
        step_s = common.median_time(step, reference_steps.sync, _STEPS.value, _WARMUP.value)
        result = dict(torch_step_s=round(step_s, 4), **reference_info(model))
    except torch.OutOfMemoryError as e:
        result = dict(torch_step_s=None, torch_error=f'out of memory: {str(e)[:120]}')
    del step, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main(_):
    with common.attention_kernel(_KERNEL.value):
        run()


def run():
    if _DEPTHWISE.value != 'auto':
        kernels.depthwise_kernel = lambda: _DEPTHWISE.value
    config, preset = build_config()
    mesh = sharding.create_mesh(config.mesh)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    with convert.shapes_only() if preset else contextlib.nullcontext():
        task = tasks.create(config)
    if preset and config.model_family == 'stage_b':  # like for like: the decoder alone, on given inputs
        task = decoder_only.DecoderOnlyTask(task)
    frozen = task.frozen_params()
    if preset:
        frozen = materialise(frozen)
    bs = config.input.batch_size
    progress(f'task built on {jax.devices()[0]}')

    result = dict(
        stage=_STAGE.value if preset else config.model_family,
        size=_SIZE.value if preset else 'config',
        batch_size=bs,
        dtype=config.dtype,
        attention_kernel=kernels.attention_kernel(DTYPES[config.dtype]),
        depthwise=kernels.depthwise_kernel(),
    )
    interleave = preset and _TORCH.value and _INTERLEAVE.value
    result['interleaved'] = bool(interleave)
    if preset and _TORCH.value and not interleave:
        progress('timing the diffusers reference')
        result.update(time_reference(config, task))
        progress(f'reference: {result}')
    elif interleave:
        reference_step, reference_model = build_reference(config, task)

    # -- ours ----------------------------------------------------------------------------------
    tx = task.optimizer()
    init_fn, abstract, state_sharding = lowering.abstract_train_state(config, task, tx, mesh, rules)
    result['params'] = sum(x.size for x in jax.tree.leaves(abstract.params))
    result['params_by_network'] = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in abstract.params.items()}
    batch_sharding = sharding.batch_sharding(mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda r, x: nn.meta.unbox(init_fn(r, x)), out_shardings=state_sharding)(
            jax.random.PRNGKey(0), train_state.example_batch(task, 1)
        )
        batch = sharding.make_global_batch(random_batch(task, bs), batch_sharding)
        frozen = jax.device_put(frozen, sharding.replicated(mesh))
    # As in train_and_evaluate, outside the mesh context: step_flops may load the config's networks
    # again from shapes, whose logical boxes must not be constrained to this mesh.
    progress('state initialised; lowering')
    lowered = lowering.lower_train_step(config, task, tx, mesh, abstract, state_sharding, frozen)
    t = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    progress(f'compiled in {compile_s:.1f} s')
    # The FLOP count's twin (scanned / remat configs) is lowered for a CPU from the model as written;
    # a plain config is counted as lowered (the shifted and grouped depthwise convs differ by < 0.1 %).
    flops = lowering.step_flops(config, lowered) / mesh.size
    progress(f'{flops:.4g} FLOP per step')
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):

        def step():
            nonlocal state
            state, metrics = compiled(state, batch, frozen)
            return metrics

        if interleave:
            import reference_steps

            step_s, torch_s = common.median_times_interleaved(
                [(step, jax.block_until_ready), (reference_step, reference_steps.sync)], _STEPS.value, _WARMUP.value
            )
            result.update(torch_step_s=round(torch_s, 4), **reference_info(reference_model))
        else:
            step_s = common.median_time(step, jax.block_until_ready, _STEPS.value, _WARMUP.value)
        progress(f'our step: {step_s:.4f} s')
        if _PROFILE.value:
            result['profile_top_ms_per_step'] = common.profile_top_ops(
                step, _PROFILE.value, compiled.as_text(), steps=3
            )
        skipped = int(jax.device_get(step())['skipped'])
    peak_dtype = jnp.bfloat16 if config.dtype == 'bfloat16' else jnp.float32
    peak = common.gemm_peak_gflops(peak_dtype)
    achieved = flops / step_s / 1e9
    result.update(
        jax_step_s=round(step_s, 4),
        images_per_s=round(bs / step_s, 2),
        compile_s=round(compile_s, 2),
        flops_per_step=flops,
        achieved_gflops=round(achieved, 1),
        gemm_peak_gflops=round(peak, 1),
        gemm_peak_dtype=jnp.dtype(peak_dtype).name,
        flop_utilisation=round(achieved / peak, 3),
        last_step_skipped=skipped,
        peak_rss_mb=common.peak_rss_mb(),
    )
    if result.get('torch_step_s'):
        result['speedup'] = round(result['torch_step_s'] / step_s, 3)
    stats = jax.devices()[0].memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
        result['jax_peak_gib'] = round(stats['peak_bytes_in_use'] / 2**30, 2)
    if jax.default_backend() == 'gpu':
        result['mfu'] = round(achieved / (H100_DENSE_BF16_TFLOPS * 1e3), 3)
    result.update(common.machine())
    common.print_result(result)


if __name__ == '__main__':
    app.run(main)
