"""Several processes: two processes on loopback train on one global mesh and checkpoint, one process
resumes; a dead peer makes the survivor exit instead of hanging; the launch recipes parse and the
cluster detection they rely on finds the process id and count."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, free_port
from wurst_jax import checkpoint, convert
from wurst_jax.models.effnet import EfficientNetEncoder

LAUNCH = sorted((REPO / 'launch').glob('*.sh')) + sorted((REPO / 'launch').glob('*.sbatch'))


@pytest.mark.parametrize('script', LAUNCH, ids=[p.name for p in LAUNCH])
def test_launch_script_parses(script):
    result = subprocess.run(['bash', '-n', str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cluster_detection_reads_slurm_and_tpu_environments(monkeypatch):
    from jax._src import clusters
    from jax._src.clusters import cloud_tpu_cluster
    for var in list(os.environ):
        if var.startswith(('SLURM_', 'TPU_', 'OMPI_', 'PMI_', 'MEGASCALE_')):
            monkeypatch.delenv(var)
    detect = lambda: clusters.ClusterEnv.auto_detect_unset_distributed_params(None, None, None, None, None, 10)
    monkeypatch.setenv('SLURM_JOB_ID', '4242')
    monkeypatch.setenv('SLURM_STEP_NODELIST', 'gpu[07-10]')
    monkeypatch.setenv('SLURM_NTASKS', '32')
    monkeypatch.setenv('SLURM_PROCID', '13')
    monkeypatch.setenv('SLURM_LOCALID', '5')
    address, count, process_id, local_devices = detect()
    assert (address.split(':')[0], count, process_id, list(local_devices)) == ('gpu07', 32, 13, [5])
    for var in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID'):
        monkeypatch.delenv(var)
    # A TPU VM of a 4-worker slice, as GKE and `tpu-vm ssh --worker=all` set it up.
    monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', True)
    monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w-0,w-1,w-2,w-3')
    monkeypatch.setenv('TPU_WORKER_ID', '2')
    monkeypatch.setenv('MEGASCALE_NUM_SLICES', '1')  # else read from the GCE metadata server
    monkeypatch.setenv('MEGASCALE_SLICE_ID', '0')
    tpu = cloud_tpu_cluster.GkeTpuCluster
    assert tpu.is_env_present()
    assert (tpu._get_worker_list_in_slice()[0], tpu.get_process_count(), tpu.get_process_id()) == ('w-0', 4, 2)


def test_explicit_distributed_flags_go_together(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'wurst_jax.main', '--config=configs/shapes.py:runlocal',
                             f'--workdir={tmp_path}', '--coordinator_address=127.0.0.1:1234'],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert '--coordinator_address, --num_processes and --process_id go together' in result.stderr


@pytest.fixture(scope='module')
def stage_c_args(tmp_path_factory):
    """Arguments of a tiny Stage C run (`configs/shapes.py:stage=c,runlocal`) on a random effnet folder."""
    root = tmp_path_factory.mktemp('multihost')
    effnet = EfficientNetEncoder(stages=(('fused', 1, 3, 1, 8, 8, 1), ('mb', 2, 3, 2, 8, 16, 1)),
                                 last_channels=32, c_latent=4)
    variables = jax.jit(effnet.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    convert.save_diffusers(effnet, variables, str(root / 'effnet'), 'effnet')
    return root, ['--config=configs/shapes.py:stage=c,runlocal', f'--config.effnet.source={root / "effnet"}',
                  f'--config.input.data_dir={root / "data"}', '--config.mesh.data=4', '--config.mesh.fsdp=2',
                  '--config.checkpoint_every_steps=2', '--config.log_every_steps=1', '--config.image_every_steps=100',
                  # A constant rate: runs of different total_steps then take the same steps.
                  '--config.optimizer.schedule=constant', '--config.optimizer.warmup_steps=0']


def launch(args, devices, *extra):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu')
    return subprocess.Popen([sys.executable, '-m', 'wurst_jax.main', *args, *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def two_processes(args, workdir, total, *extra):
    port = free_port()
    return [launch(args, 4, f'--workdir={workdir}', f'--config.total_steps={total}',
                   f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}',
                   '--distributed_timeout=120', *extra)
            for i in range(2)]


def finish(proc, timeout=600):
    _, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


@pytest.mark.slow  # about 3.5 min on 2 cores: three launches, each compiling the step
def test_two_processes_train_then_one_process_resumes(stage_c_args, tmp_path):
    """2 processes x 4 devices train 4 steps on a data=4 x fsdp=2 mesh; 1 process x 8 devices resumes
    to step 6. Final params equal a 1-process run of 6 steps to 1e-5: the same examples reach each
    step, but the global batch is assembled in another row order, so float sums round differently."""
    root, args = stage_c_args
    multi, single = tmp_path / 'multi', tmp_path / 'single'
    procs = two_processes(args, multi, 4)
    logs = [finish(p) for p in procs]
    assert 'JAX process 1 of 2, 4 local devices' in logs[1]
    assert (multi / 'checkpoints' / '4').is_dir()
    assert len(list(multi.glob('events.out.tfevents.*'))) == 1  # process 1 writes no TensorBoard file
    resumed = finish(launch(args, 8, f'--workdir={multi}', '--config.total_steps=6'))
    assert 'Restored checkpoint at step 4' in resumed
    finish(launch(args, 8, f'--workdir={single}', '--config.total_steps=6'))
    for ema in (False, True):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                     checkpoint.load_params(str(multi), ema=ema), checkpoint.load_params(str(single), ema=ema))


@pytest.mark.slow
def test_dead_peer_makes_the_survivor_exit(stage_c_args, tmp_path):
    root, args = stage_c_args
    procs = two_processes(args, tmp_path / 'run', 100_000, '--heartbeat_timeout=10')
    deadline = time.time() + 300
    while not (tmp_path / 'run' / 'checkpoints' / '2').is_dir():
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    procs[0].communicate(timeout=120)  # raises TimeoutExpired if it hangs
    assert procs[0].returncode != 0
    print(f'survivor exited {time.time() - killed_at:.1f} s after its peer died')
