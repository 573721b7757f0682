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

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / 'configs').glob('*.py'))


def load_config(name: str, arg: str | None = None):
    """Loads configs/<name>.py the way --config=configs/<name>.py:<arg> does."""
    spec = importlib.util.spec_from_file_location(f'config_{name}', REPO / 'configs' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


@pytest.fixture
def tiny_shapes_config(tmp_path):
    """configs/shapes.py:runlocal with its data under this test's tmp dir."""
    config = load_config('shapes', 'runlocal')
    config.input.data_dir = str(tmp_path / 'data')
    return config
