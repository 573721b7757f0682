"""What the benchmarks share: the preset configs they time, the GEMM peak, timing, and the import
stand-ins that let `wurst_jax.train` load on a machine without TensorFlow.

The presets describe what `--stage` / `--size` mean; every one is an ordinary config of this repo
(configs/shapes.py or configs/stage_{b,c}.py) with a few fields changed, so the step timed is the
step `python -m wurst_jax.main` runs.
"""

import ast
import contextlib
import importlib.util
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import types
from typing import Any, Callable

# Platform / allocator settings must be in the environment before jax initialises a backend.
# On a GPU the PyTorch reference and our step share the card in one process: JAX must not grab
# 75 % of it up front. Set here so that every bench script gets the same behaviour.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.92')


def import_torch_before_tensorflow() -> None:
    """PyTorch's references must load before anything imports TensorFlow (clu does): in the other
    order, triton's import segfaults on the project host (TF 2.21, torch 2.14)."""
    if importlib.util.find_spec('torch') and importlib.util.find_spec('diffusers'):
        import diffusers.pipelines.deprecated.wuerstchen  # noqa: F401
        import torch  # noqa: F401


def allow_train_import_without_tensorflow() -> None:
    """`wurst_jax.train` imports clu's metric writers, which import TensorFlow at module level.
    The benchmarks never write summaries, and TensorFlow is not installed on some hosts (the GPU image),
    so there a stub stands in for the one clu module that needs it, `clu.metric_writers.summary_writer`
    (clu has no fallback of its own; with the stub, `create_default_writer(None)` logs through absl).
    Harmless where TF exists."""
    if importlib.util.find_spec('tensorflow'):
        return
    stub = types.ModuleType('clu.metric_writers.summary_writer')

    class SummaryWriter:
        def __init__(self, *args, **kwargs):
            raise ImportError('SummaryWriter needs tensorflow')

    stub.SummaryWriter = SummaryWriter
    sys.modules['clu.metric_writers.summary_writer'] = stub


import_torch_before_tensorflow()
allow_train_import_without_tensorflow()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from wurst_jax.convert import core  # noqa: E402
from wurst_jax.models import kernels  # noqa: E402
from wurst_jax.models.clip import CLIPTextModel  # noqa: E402
from wurst_jax.models.effnet import EfficientNetEncoder  # noqa: E402
from wurst_jax.models.stage_a import VQGAN  # noqa: E402

STAGES = ('a', 'b', 'c', 'pixart')
SIZES = ('tiny', 'small', 'full')


def parse_override(text: str) -> tuple[str, Any]:
    """'model.depth=8' -> ('model.depth', 8); values are Python literals or plain strings."""
    field, _, value = text.partition('=')
    try:
        return field, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return field, value


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> None:
    """Sets each 'dotted.field=value' of `overrides` on the config (ConfigDict checks the type)."""
    for item in overrides:
        field, value = parse_override(item)
        *parents, leaf = field.split('.')
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value


# -- presets -----------------------------------------------------------------------------------


def _stage_c_folders(root: str, size: str) -> tuple[str, str]:
    """Config-only folders of the frozen text encoder and effnet a Stage C preset names."""
    if size == 'full':
        sys.path.insert(0, os.path.dirname(__file__))
        import full_size_models

        text_module = full_size_models.MODELS['clip_bigg'][0]
    else:
        width = {'tiny': 64, 'small': 256}[size]
        text_module = CLIPTextModel(
            vocab_size=512,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=1,
            num_attention_heads=4,
            hidden_act='gelu',
            max_position_embeddings=77,
            projection_dim=None,
        )
    clip, effnet = os.path.join(root, f'clip_{size}'), os.path.join(root, 'effnet')
    core.write_config(text_module, clip, 'clip_text')
    core.write_config(EfficientNetEncoder(c_latent=16), effnet, 'effnet')
    return clip, effnet


STAGE_C_MODELS = {  # (c, depth, heads, batch, latent side); 'full' is configs/stage_c.py's model
    'tiny': dict(c=64, depth=2, num_heads=4, batch=4, side=12),
    'small': dict(c=256, depth=4, num_heads=8, batch=8, side=24),  # the calibration model (3.7 M params)
    'full': dict(c=1536, depth=32, num_heads=24, batch=64, side=24),
}


def stage_c_config(size: str, root: str) -> ml_collections.ConfigDict:
    """configs/stage_c.py trained on precomputed latents and text states (no encoder in the step, as
    a large run does and as the PyTorch reference does), with the model of `size`. 'tiny' and
    'small' are float32, unrolled and not rematerialised (the CPU targets); 'full' is the config as is."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
    from configs import stage_c

    clip, effnet = _stage_c_folders(root, size)
    p = STAGE_C_MODELS[size]
    config = stage_c.get_config(f'clip={clip},effnet={effnet},batch={p["batch"]},sharding=dp')
    config.text.tokenizer = 'bytes'  # the config-only CLIP folder has no tokenizer.json; tokens are never encoded
    config.effnet.image_size = p['side'] * 32  # the effnet's map is 1/32 of its input
    config.input.image_size = config.input.resize = p['side'] * 32
    config.model.update(c=p['c'], depth=p['depth'], num_heads=p['num_heads'], dropout=0.0)
    if size != 'full':
        config.dtype = 'float32'
        config.model.update(scan_blocks=False, remat_policy='none')
    return config


def shapes_config(stage: str, size: str, root: str) -> ml_collections.ConfigDict:
    """configs/shapes.py (`runlocal` for 'tiny'). Stage A without the adversarial loss (the
    diffusers VQGAN has no discriminator; before `adv_start` ours is not run either); Stage B reads
    a config-only folder of the shapes Stage A VQGAN instead of a trained Stage A run."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
    from configs import shapes

    config = shapes.get_config(f'stage={stage}' + (',runlocal' if size == 'tiny' else ''))
    if stage == 'a':
        config.loss.adv_weight = 0.0
    config.input.batch_size = 4 if size == 'tiny' else 8
    if stage == 'b':
        vqgan_config = shapes.get_config('stage=a' + (',runlocal' if size == 'tiny' else '')).model
        folder = os.path.join(root, f'vqgan_{size}')
        core.write_config(VQGAN(**vqgan_config.to_dict()), folder, 'vqgan')
        config.stage_a.source = folder
    return config


def preset_config(stage: str, size: str, root: str | None = None) -> ml_collections.ConfigDict:
    """The config `--stage`/`--size` name; config-only model folders go under `root` (a temp dir)."""
    root = root or tempfile.mkdtemp(prefix='wurst_bench_')
    if size == 'full' and stage != 'c':
        raise ValueError(f'--size=full exists for stage c only, not {stage}')
    if stage == 'c':
        return stage_c_config(size, root)
    if stage == 'pixart':  # PixArt-α's DiT as the Stage C model of `size`, 2x2 patches of the map
        config = stage_c_config(size, root)
        config.model.update(backbone='pixart', patch_size=2)
        return config
    return shapes_config(stage, size, root)


# -- measuring ---------------------------------------------------------------------------------


def gemm_peak_gflops(dtype: Any = jnp.float32, n: int | None = None, repeats: int = 10) -> float:
    """Median matmul throughput of this process's default device, GFLOP/s (2048^3 on a CPU,
    8192^3 on an accelerator), on random data."""
    on_cpu = jax.default_backend() == 'cpu'
    n = n or (2048 if on_cpu else 8192)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(jnp.dot)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def median_time(step: Callable[[], Any], sync: Callable[[Any], Any], steps: int, warmup: int = 2) -> float:
    """Median wall time of `step()` (each result passed to `sync` before the clock stops)."""
    for _ in range(warmup):
        sync(step())
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def median_times_interleaved(
    steps_and_syncs: list[tuple[Callable[[], Any], Callable[[Any], Any]]], steps: int, warmup: int = 2
) -> list[float]:
    """Median wall time of each `step()`, the steps called in turn within every round, so that load
    that comes and goes on a shared host falls on all of them alike."""
    for _ in range(warmup):
        for step, sync in steps_and_syncs:
            sync(step())
    times = [[] for _ in steps_and_syncs]
    for _ in range(steps):
        for (step, sync), record in zip(steps_and_syncs, times):
            t = time.perf_counter()
            sync(step())
            record.append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def torch_fwd_bwd(module: Any, x: Any, d_out: Any) -> Callable[[], Any]:
    """A step running torch `module` on `x` (requires_grad) and back from `d_out`; returns x's grad."""

    def step():
        module.zero_grad()
        x.grad = None
        module(x).backward(d_out)
        return x.grad

    return step


def kernel_times_ms(
    shapes: dict[str, tuple[int, ...]],
    jax_step: Callable[[str, tuple[int, ...]], Callable[[], Any]],
    torch_step: Callable[[tuple[int, ...]], Callable[[], Any]],
    kinds: tuple[str, ...],
    steps: int,
) -> dict[str, Any]:
    """ms per fwd + bwd at each named shape: each JAX kernel in `kinds` (timed in turns) and torch's."""
    result = {}
    for name, shape in shapes.items():
        # torch on its own first: its OpenMP threads slow down after JAX steps (bench/README.md).
        torch_s = median_time(torch_step(shape), lambda y: float(y.sum()), steps, 2)
        fns = [jax_step(kind, shape) for kind in kinds]
        times = median_times_interleaved([(fn, jax.block_until_ready) for fn in fns], steps)
        result[name] = {kind: round(t * 1e3, 2) for kind, t in zip([*kinds, 'torch'], [*times, torch_s])}
        result[name]['shape'] = list(shape)
    result['unit'] = 'ms per fwd + bwd'
    return result


def profile_top_ops(
    step: Callable[[], Any], logdir: str, hlo_text: str = '', steps: int = 3, top: int = 15
) -> dict[str, Any]:
    """Traces `steps` calls of `step` into logdir (jax.profiler, with a Perfetto JSON file) and returns
    the `top` XLA ops (thunks / fusions) by total duration, in ms per step, each with the start of
    its instruction in `hlo_text` (the compiled step's HLO) to say what it computes."""
    import collections
    import glob
    import gzip

    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(step())
    path = max(glob.glob(os.path.join(logdir, '**', '*.trace.json.gz'), recursive=True), key=os.path.getmtime)
    with gzip.open(path) as f:
        events = json.load(f)
    events = events['traceEvents'] if isinstance(events, dict) else events
    total = collections.Counter()
    for e in events:
        name = e.get('name', '?')
        if (
            e.get('ph') == 'X'
            and 'dur' in e
            and not name.startswith('$')
            and '::' not in name
            and not name.startswith('Pjit')
        ):
            total[name] += e['dur']
    instructions = {}
    for line in hlo_text.splitlines():
        head = line.strip().removeprefix('ROOT ').split(' = ', 1)
        if len(head) == 2:
            instructions.setdefault(head[0].lstrip('%'), head[1][:150])
    return {name: [round(us / 1e3 / steps, 2), instructions.get(name, '')] for name, us in total.most_common(top)}


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def machine() -> dict[str, Any]:
    """Where the figures were taken: device, CPU count and load (the 2-core host is shared)."""
    device = jax.devices()[0]
    return dict(
        device=getattr(device, 'device_kind', device.platform),
        backend=jax.default_backend(),
        cpu_count=os.cpu_count(),
        load_avg_1m=round(os.getloadavg()[0], 2),
        jax=jax.__version__,
        date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
    )


def print_result(result: dict[str, Any]) -> None:
    """The benchmark's figures as one JSON object on the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


def attention_kernel(kernel: str):
    """Context for a bench's `--attention_kernel`: `kernels.forced_attention_kernel`, or for 'auto' the
    backend's own choice (`kernels.attention_kernel`)."""
    return contextlib.nullcontext() if kernel == 'auto' else kernels.forced_attention_kernel(kernel)
