"""Test setup: 8 fake CPU devices, set before anything imports jax."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# torch's triton segfaults when it is first imported after TensorFlow (which clu's writers load),
# so a run that collects a training test before a parity test would crash; load it first.
try:
    import triton  # noqa: F401
except ImportError:
    pass

import importlib.util
import pathlib
import socket
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# Training experiments; configs/eval.py configures the evaluation job (tests/test_evaluate.py).
CONFIGS = sorted(p for p in (REPO / 'configs').glob('*.py') if p.stem != 'eval')


def load_config(name: str, arg: str | None = None):
    """Loads configs/<name>.py the way --config=configs/<name>.py:<arg> does."""
    spec = importlib.util.spec_from_file_location(f'config_{name}', REPO / 'configs' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_module(*args, timeout=900):
    return subprocess.run([sys.executable, '-m', *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='session')
def demo_root(tmp_path_factory):
    """A root with all three stages trained by `wurst_jax.demo --runlocal` (a few steps each)."""
    root = tmp_path_factory.mktemp('demo')
    result = run_module('wurst_jax.demo', f'--workdir={root}', f'--data_dir={root / "data"}', '--runlocal',
                        '--num_eval_prompts=8')
    assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture
def tiny_shapes_config(tmp_path):
    """configs/shapes.py:runlocal with its data under this test's tmp dir."""
    config = load_config('shapes', 'runlocal')
    config.input.data_dir = str(tmp_path / 'data')
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
    config = transformers.CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                                         intermediate_size=2 * hidden_size, num_hidden_layers=1,
                                         num_attention_heads=2, eos_token_id=tokenizer.eos_token_id)
    randomise(transformers.CLIPTextModel(config), seed=0).save_pretrained(path)


def random_variables(module, *inputs):
    """Random values in the shapes of module.init (running variances positive), without running init
    (slow on CPU for many small convs)."""
    import flax.linen as nn
    import jax
    import numpy as np
    shapes = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs)))
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: (np.ones(s.shape, np.float32) if path[-1].key == 'var'
                         else 0.1 * rng.standard_normal(s.shape).astype(np.float32)), shapes)
