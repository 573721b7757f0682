"""Test setup: 8 fake CPU devices, set before anything imports jax."""

import os

# Unoptimised LLVM code generation: a third less CPU time for a suite that mostly compiles small
# programs once (the launches of `Children` below run the same way).
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0'
).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# torch's triton segfaults when it is first imported after TensorFlow (which clu's writers load),
# so a run that collects a training test before a parity test would crash; load it first.
try:
    import triton  # noqa: F401
except ImportError:
    pass

import contextlib
import importlib.util
import itertools
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# Training experiments; configs/eval.py configures the evaluation job (tests/test_evaluate.py).
CONFIGS = sorted(p for p in (REPO / 'configs').glob('*.py') if p.stem != 'eval')


def _fail_skip(report):
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = 'failed'
    report.longrepr = f'skipped, which this suite counts as a failure (only `accelerator` tests may skip): {reason}'


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip is a failure unless the test is marked `accelerator`: a missing test dependency or a skip
    inside a test must not count as a pass."""
    report = yield
    if report.skipped and not hasattr(report, 'wasxfail') and item.get_closest_marker('accelerator') is None:
        _fail_skip(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """The same for a whole module skipped at collection (`pytest.importorskip` at module level)."""
    report = yield
    if report.skipped:
        _fail_skip(report)
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Groups for pytest-xdist's `--dist loadgroup`: a module's tests run on one worker, so its module
    fixtures are built once, and every test of the session's demo run shares the worker that trained it.
    A test marked with its own `xdist_group` keeps it (long tests that share no fixture spread out)."""
    for item in items:
        if item.get_closest_marker('xdist_group') is None:
            group = 'demo_root' if 'demo_root' in item.fixturenames else item.module.__name__
            item.add_marker(pytest.mark.xdist_group(group))
    # The groups that run for minutes (the demo run's, the two-process runs) go out first, so the
    # short ones fill in after them and both workers finish together.
    items.sort(key=lambda item: not ('demo_root' in item.fixturenames or item.get_closest_marker('slow')))


def pytest_collection_finish(session):
    """pytest-xdist sends a group to one worker by suffixing each test's node id with it; a pytest it
    does not support (9.x keeps node ids elsewhere) drops the suffix without a word, and every module
    fixture, the demo run included, would then be built on both workers."""
    if getattr(session.config.option, 'loadgroup', False) and any('@' not in item.nodeid for item in session.items):
        raise pytest.UsageError(
            'pytest-xdist did not group the tests (--dist loadgroup): install the pytest '
            'and pytest-xdist versions pinned in requirements-test.txt'
        )


def load_config(name: str, arg: str | None = None):
    """Loads configs/<name>.py the way --config=configs/<name>.py:<arg> does."""
    spec = importlib.util.spec_from_file_location(f'config_{name}', REPO / 'configs' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def _fixed_ports() -> range:
    """The larger stretch of ports the kernel never hands out as ephemeral ones (a bind to port 0, an
    outgoing connection's local port): outside /proc/sys/net/ipv4/ip_local_port_range."""
    low, high = map(int, pathlib.Path('/proc/sys/net/ipv4/ip_local_port_range').read_text().split())
    return max(range(1024, low), range(high + 1, 65536), key=len)


_PORTS = _fixed_ports()
# Concurrent test runs on one host start at different points (by process id) and each walks on from there.
_NEXT_PORT = itertools.count(os.getpid() * 7919 % len(_PORTS))


def free_port() -> int:
    """A port for a coordinator to listen on: free now, handed out once per test run, and outside the
    ephemeral range, so no socket bound to port 0 can take it between this check and the listen (the
    race of binding port 0, closing it and passing the number on)."""
    for _ in range(len(_PORTS)):
        port = _PORTS[next(_NEXT_PORT) % len(_PORTS)]
        with socket.socket() as s:
            try:
                s.bind(('', port))
            except OSError:  # taken by something else on this host
                continue
        return port
    raise RuntimeError(f'no free port in {_PORTS}')


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group `proc` leads, even after `proc` itself exited (its children may not
    have), then reaps `proc`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


class Children:
    """Processes a test or fixture starts: each leads its own process group (start_new_session), and
    `kill_all` kills the groups, so grain's input workers and any process left hanging end with it.
    Output goes to a log file per process, not a pipe (a pipe nobody drains fills and blocks the
    child). Launches of `python -m wurst_jax.main` share one persistent compilation cache per test
    run, so a relaunch of the same config skips compiling its step."""

    def __init__(self, log_dir: pathlib.Path, compile_cache: pathlib.Path):
        self.log_dir, self.compile_cache, self.procs = log_dir, compile_cache, []

    def start(self, *args: str, devices: int = 8) -> subprocess.Popen:
        """`python -m ARGS` in the repository on `devices` fake CPU devices; `proc.log` names its output."""
        # Unoptimised LLVM code generation: a third less CPU time per launch. Every launch of a test
        # compiles alike, so the runs it compares still match bit for bit.
        xla_flags = f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0'
        env = dict(
            os.environ,
            XLA_FLAGS=xla_flags,
            JAX_PLATFORMS='cpu',
            JAX_COMPILATION_CACHE_DIR=str(self.compile_cache),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
        )
        log = self.log_dir / f'process_{len(self.procs)}.log'
        with open(log, 'w') as out:
            proc = subprocess.Popen(
                [sys.executable, '-m', *args],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        proc.log = log
        self.procs.append(proc)
        return proc

    @staticmethod
    def output(proc: subprocess.Popen) -> str:
        return proc.log.read_text(errors='replace')

    def wait(self, proc: subprocess.Popen, timeout: float = 600) -> str:
        """Waits for `proc` to exit (killing its group after `timeout` s) and returns its output."""
        try:
            proc.wait(timeout)
        finally:
            _kill_group(proc)
        return self.output(proc)

    def finish(self, proc: subprocess.Popen, timeout: float = 600) -> str:
        """`wait`, asserting that it exited 0."""
        return self.finish_all([proc], timeout)[0]

    def finish_all(self, procs: list[subprocess.Popen], timeout: float = 600) -> list[str]:
        """`finish` for processes that run together (one job's): once one exits non-zero the others
        are killed, and its output is in the failure."""
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
                assert time.monotonic() < deadline, f'not done within {timeout} s'
                time.sleep(0.05)
            failed = [p for p in procs if p.poll()]
        finally:
            for proc in procs:
                _kill_group(proc)
        assert not failed, f'{failed[0].args} exited {failed[0].returncode}:\n{self.output(failed[0])[-3000:]}'
        return [self.output(proc) for proc in procs]

    def run(self, *args: str, devices: int = 8, timeout: float = 600) -> str:
        """`start` then `finish`."""
        return self.finish(self.start(*args, devices=devices), timeout)

    def wait_until(self, condition, procs, timeout: float = 600, poll: float = 0.01) -> None:
        """Polls `condition()` until true; fails if any of `procs` exits first or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while not condition():
            for proc in procs:
                assert proc.poll() is None, f'exited {proc.returncode} first:\n{self.output(proc)[-3000:]}'
            assert time.monotonic() < deadline, f'not reached within {timeout} s'
            time.sleep(poll)

    def kill_all(self) -> None:
        for proc in self.procs:
            _kill_group(proc)


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory):
    """The persistent compilation cache of this test run's launches, shared by pytest-xdist's workers
    (JAX writes its entries atomically)."""
    root = tmp_path_factory.getbasetemp()
    cache = (root.parent if os.environ.get('PYTEST_XDIST_WORKER') else root) / 'compile_cache'
    cache.mkdir(exist_ok=True)
    return cache


@contextlib.contextmanager
def _children(log_dir, cache):
    children = Children(log_dir, cache)
    try:
        yield children
    finally:
        children.kill_all()


@pytest.fixture
def children(tmp_path, compile_cache):
    """Children of one test, killed when it ends, pass or fail."""
    with _children(tmp_path, compile_cache) as c:
        yield c


@pytest.fixture(scope='module')
def module_children(tmp_path_factory, compile_cache):
    """Children of a module's fixtures, killed when the module's tests are done."""
    with _children(tmp_path_factory.mktemp('logs'), compile_cache) as c:
        yield c


def run_module(*args, timeout=900):
    """`python -m ARGS` to the end, its process group killed when it returns or fails."""
    proc = subprocess.Popen(
        [sys.executable, '-m', *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        _kill_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def main_args(config: str, workdir, data_dir, total: int, *overrides: str) -> list[str]:
    """`wurst_jax.main` arguments of a tiny run of `config` (e.g. configs/shapes.py:runlocal) on a
    data=4 x fsdp=2 mesh at a constant learning rate: its step then does not depend on total_steps,
    so runs of any length take the same steps and share one compiled step through the cache."""
    return [
        'wurst_jax.main',
        f'--config={config}',
        f'--workdir={workdir}',
        f'--config.input.data_dir={data_dir}',
        f'--config.total_steps={total}',
        '--config.mesh.data=4',
        '--config.mesh.fsdp=2',
        '--config.optimizer.schedule=constant',
        '--config.optimizer.warmup_steps=0',
        *overrides,
    ]


@pytest.fixture(scope='session')
def tiny_stage_folders(tmp_path_factory):
    """Folders of a random effnet (Stage C's effnet.source) and a random VQGAN (Stage B's
    stage_a.source), sized for configs/shapes.py's runlocal variants."""
    import numpy as np

    from wurst_jax import convert
    from wurst_jax.models.effnet import EfficientNetEncoder
    from wurst_jax.models.stage_a import VQGAN

    root = tmp_path_factory.mktemp('stages')
    effnet = EfficientNetEncoder(
        stages=(('fused', 1, 3, 1, 8, 8, 1), ('mb', 2, 3, 2, 8, 16, 1)), last_channels=32, c_latent=4
    )
    convert.save_diffusers(
        effnet, random_variables(effnet, np.zeros((1, 32, 32, 3), np.float32)), str(root / 'effnet'), 'effnet'
    )
    vqgan = VQGAN(levels=2, embed_dim=8, bottleneck_blocks=1, latent_channels=4, num_codes=16)
    convert.save_diffusers(
        vqgan, random_variables(vqgan, np.zeros((1, 16, 16, 3), np.float32)), str(root / 'vqgan'), 'vqgan'
    )
    return {'effnet': root / 'effnet', 'vqgan': root / 'vqgan'}


@pytest.fixture(scope='session')
def demo_root(tmp_path_factory):
    """A root with all three stages trained by `wurst_jax.demo --runlocal` (a few steps each)."""
    root = tmp_path_factory.mktemp('demo')
    result = run_module(
        'wurst_jax.demo', f'--workdir={root}', f'--data_dir={root / "data"}', '--runlocal', '--num_eval_prompts=8'
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture
def tiny_shapes_config(tmp_path):
    """configs/shapes.py:runlocal with its data under this test's tmp dir."""
    config = load_config('shapes', 'runlocal')
    config.input.data_dir = str(tmp_path / 'data')
    return config


@pytest.fixture(scope='session')
def finetune_arg(tmp_path_factory):
    """configs/wuerstchen_v2_prior_finetune.py's (and its LoRA twin's) argument string naming tiny random
    folders made here: a diffusers prior, a transformers CLIP text encoder with its tokenizer, an
    effnet, and eight captioned images."""
    import numpy as np
    import torch
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior
    from PIL import Image

    from torch_reference import randomise
    from wurst_jax.convert import core
    from wurst_jax.models.effnet import EfficientNetEncoder

    tmp_path = tmp_path_factory.mktemp('finetune')
    prior_dir, clip_dir, effnet_dir, images = (tmp_path / n for n in ('prior', 'clip', 'effnet', 'images'))
    tiny_clip_folder(clip_dir)
    prior = randomise(WuerstchenPrior(c_in=4, c=16, c_cond=32, c_r=8, depth=2, nhead=2, dropout=0.0), seed=1)
    with torch.no_grad():
        prior.out[1].weight.mul_(0.05)
    prior.save_pretrained(prior_dir)
    effnet = EfficientNetEncoder(
        stages=(('fused', 1, 3, 1, 8, 8, 1), ('mb', 2, 3, 2, 8, 16, 1)), last_channels=16, c_latent=4
    )
    core.save_diffusers(
        effnet, random_variables(effnet, np.zeros((1, 32, 32, 3), np.float32)), str(effnet_dir), 'effnet'
    )
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f'{i}.png')
        (images / f'{i}.txt').write_text(['the cat', 'a photo of a dog'][i % 2])
    return f'prior={prior_dir},clip={clip_dir},effnet={effnet_dir},images={images},batch=8,res=32,steps=2'


def small_prior_run_config(name: str, arg: str, data_dir):
    """configs/<name>.py:<arg> (the prior fine-tune or its LoRA twin) logging, sampling and saving every step."""
    config = load_config(name, arg)
    config.input.data_dir = str(data_dir)
    config.optimizer.warmup_steps = 0
    config.eval.update(num_examples=8, batch_size=8, num_grid_images=2, grid_columns=2)
    config.sample.update(prior_steps=2, prior_timesteps='linspace')
    config.log_every_steps = config.image_every_steps = config.checkpoint_every_steps = 1
    return config


CLIP_TEST_WORDS = ['the', 'cat', 'photo', 'of', 'a', 'dog']


def tiny_clip_tokenizer_folder(path, pad_token: str) -> None:
    """A CLIP BPE over a few letters (whole words merged), saved the way the hub folders are."""
    import transformers

    chars = sorted(set(''.join(CLIP_TEST_WORDS)) | set('!.,xyz'))
    vocab = {}
    for token in chars + [c + '</w>' for c in chars]:
        vocab[token] = len(vocab)
    merges = []
    for word in CLIP_TEST_WORDS:
        pieces = list(word[:-1]) + [word[-1] + '</w>']
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ('<|startoftext|>', '<|endoftext|>'):
        vocab[special] = len(vocab)
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token)
    tok.save_pretrained(path)


def tiny_clip_folder(path, hidden_size: int = 32) -> None:
    """A random one-layer transformers CLIP text model with the tokenizer above, as a hub folder."""
    import transformers

    from torch_reference import randomise

    tiny_clip_tokenizer_folder(path, '!')
    tokenizer = transformers.CLIPTokenizer.from_pretrained(path)
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        eos_token_id=tokenizer.eos_token_id,
    )
    randomise(transformers.CLIPTextModel(config), seed=0).save_pretrained(path)


T5_TEST_WORDS = ['a', 'photo', 'of', 'the', 'cat', 'dog', 'on', 'red', 'blue', 'sitting', 'mat']


def tiny_t5_tokenizer_folder(path) -> None:
    """A Unigram over whole words and letters, pre-tokenised and post-processed as T5's tokenizer.json:
    <pad>=0, </s>=1, <unk>=2, `</s>` appended."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = [('<pad>', 0.0), ('</s>', 0.0), ('<unk>', 0.0), ('\u2581', -2.0)]
    vocab += [('\u2581' + w, -3.0 - 0.1 * i) for i, w in enumerate(T5_TEST_WORDS)]
    vocab += [(c, -6.0) for c in 'abcdefghijklmnopqrst']
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme='always')]
    )
    tokenizer.decoder = decoders.Metaspace(replacement='\u2581', prepend_scheme='always')
    tokenizer.post_processor = processors.TemplateProcessing(
        single='$A </s>', pair='$A </s> $B </s>', special_tokens=[('</s>', 1)]
    )
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ('<pad>', '</s>', '<unk>')])
    os.makedirs(path, exist_ok=True)
    tokenizer.save(os.path.join(path, 'tokenizer.json'))


def tiny_t5_folder(path, d_model: int = 32) -> None:
    """A random two-layer transformers T5 encoder (gated-GELU, as T5 v1.1) with the tokenizer above."""
    import transformers

    from torch_reference import randomise

    tiny_t5_tokenizer_folder(path)
    config = transformers.T5Config(
        vocab_size=64,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        feed_forward_proj='gated-gelu',
    )
    randomise(transformers.T5EncoderModel(config), seed=0).save_pretrained(path)


def random_variables(module, *inputs):
    """Random values in the shapes of module.init (running variances positive), without running init
    (slow on CPU for many small convs)."""
    import flax.linen as nn
    import jax
    import numpy as np

    shapes = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs)))
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: (
            np.ones(s.shape, np.float32)
            if path[-1].key == 'var'
            else 0.1 * rng.standard_normal(s.shape).astype(np.float32)
        ),
        shapes,
    )
