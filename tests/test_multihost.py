"""Several processes: every model family trains, evaluates, writes images and checkpoints as two
processes on loopback sharing one global mesh; one process resumes a two-process checkpoint; a dead
peer makes the survivor exit instead of hanging; the launch recipes parse and the cluster detection
they rely on finds the process id and count."""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from conftest import REPO, free_port, main_args
from wurst_jax import checkpoint

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


def test_explicit_distributed_flags_go_together(children, tmp_path):
    proc = children.start(
        'wurst_jax.main',
        '--config=configs/shapes.py:runlocal',
        f'--workdir={tmp_path}',
        '--coordinator_address=127.0.0.1:1234',
    )
    output = children.wait(proc, timeout=300)
    assert proc.returncode != 0
    assert '--coordinator_address, --num_processes and --process_id go together' in output


STEPS = 2
# Each family's tiny config and the local folder it reads a frozen network from (tiny_stage_folders).
FAMILIES = {
    'stage_a': ('configs/shapes.py:stage=a,runlocal', None),
    'stage_b': ('configs/shapes.py:stage=b,runlocal', ('stage_a.source', 'vqgan')),
    'stage_c': ('configs/shapes.py:stage=c,runlocal', ('effnet.source', 'effnet')),
    'stage_c_pixart': ('configs/shapes.py:stage=c,backbone=pixart,runlocal', ('effnet.source', 'effnet')),
    'pixel': ('configs/growing.py:arm=core,runlocal', None),
}


def family_args(family, folders, workdir, data_dir, total=STEPS):
    """A tiny run of `family` that checkpoints, writes images and evaluates once, at its last step."""
    config, frozen = FAMILIES[family]
    source = [f'--config.{frozen[0]}={folders[frozen[1]]}'] if frozen else []
    return main_args(
        config,
        workdir,
        data_dir,
        total,
        f'--config.checkpoint_every_steps={total}',
        f'--config.image_every_steps={total}',
        '--config.log_every_steps=1',
        *source,
    )


def two_processes(children, args, *extra):
    """Processes 0 and 1 of one job, 4 fake devices each, joined through a coordinator on loopback."""
    port = free_port()
    return [
        children.start(
            *args,
            f'--coordinator_address=127.0.0.1:{port}',
            '--num_processes=2',
            f'--process_id={i}',
            '--distributed_timeout=120',
            *extra,
            devices=4,
        )
        for i in range(2)
    ]


@pytest.fixture(scope='module')
def two_process_run(module_children, tiny_stage_folders, tmp_path_factory):
    """family -> (workdir, [output of process 0, of process 1]) of a two-process run of STEPS steps,
    launched once per module."""
    runs = {}

    def run(family):
        if family not in runs:
            root = tmp_path_factory.mktemp(family)
            procs = two_processes(module_children, family_args(family, tiny_stage_folders, root / 'run', root / 'data'))
            runs[family] = root / 'run', module_children.finish_all(procs)
        return runs[family]

    return run


def _own_group(family):
    """One xdist group per family run, so the runs spread over the workers (see conftest)."""
    return pytest.mark.xdist_group(f'two_processes_{family}')


@pytest.mark.slow  # each family compiles its step, sampling and evaluation in two processes
@pytest.mark.parametrize('family', [pytest.param(f, marks=_own_group(f)) for f in FAMILIES])
def test_two_processes_train_evaluate_write_images_and_checkpoint(two_process_run, family):
    """2 processes x 4 devices on one data=4 x fsdp=2 mesh: the job trains, checkpoints, writes the
    image grid and evaluates; both processes compute the same evaluation from the global arrays."""
    workdir, logs = two_process_run(family)
    assert 'JAX process 1 of 2, 4 local devices' in logs[1]
    assert checkpoint.all_steps(str(workdir)) == [STEPS] and checkpoint.is_complete(str(workdir))
    assert (workdir / f'samples_{STEPS:07d}.png').is_file()
    assert len(list(workdir.glob('events.out.tfevents.*'))) == 1  # process 1 writes no TensorBoard file
    (result,) = [json.loads(line) for line in (workdir / 'eval.jsonl').read_text().splitlines()]
    assert result['step'] == STEPS and all(np.isfinite(v) for v in result.values())
    evals = [re.findall(r'eval at step \d+: (.*)', log) for log in logs]
    assert len(evals[0]) == 1 and evals[0] == evals[1]


@pytest.mark.slow
@_own_group('stage_c')
def test_two_processes_train_then_one_process_resumes(two_process_run, tiny_stage_folders, children, tmp_path):
    """The two-process Stage C job's checkpoint, resumed by 1 process x 8 devices for 2 more steps,
    equals a 1-process run of as many steps to 1e-5 (the collectives between processes sum in
    another order); step and rng exactly. (Not Stage A: Adam amplifies the rounding of its conv
    biases ahead of a BatchNorm, whose gradients are next to zero.)"""
    multi, _ = two_process_run('stage_c')
    resumed, single, data_dir = tmp_path / 'resumed', tmp_path / 'single', multi.parent / 'data'
    shutil.copytree(multi, resumed)
    log = children.run(*family_args('stage_c', tiny_stage_folders, resumed, data_dir, STEPS + 2))
    assert f'Restored checkpoint at step {STEPS}' in log
    assert 'the data position was saved by 2 processes; carrying it over to 1 processes' in log
    children.run(*family_args('stage_c', tiny_stage_folders, single, data_dir, STEPS + 2))
    (_, a), (_, b) = checkpoint.load_trained(str(resumed)), checkpoint.load_trained(str(single))
    for exact in ('step', 'rng'):
        np.testing.assert_array_equal(a.pop(exact), b.pop(exact))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), a, b)


@pytest.mark.slow
@_own_group('stage_a')
def test_dead_peer_makes_the_survivor_exit(two_process_run, tiny_stage_folders, children, tmp_path):
    multi, _ = two_process_run('stage_a')  # its step, compiled once, is this job's too (the cache)
    args = family_args('stage_a', tiny_stage_folders, tmp_path / 'run', multi.parent / 'data', 100_000)
    procs = two_processes(children, args, '--heartbeat_timeout=10')
    children.wait_until(lambda: '] [2] ' in children.output(procs[0]), procs)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    children.wait(procs[0], timeout=120)  # fails if it hangs
    assert procs[0].returncode not in (0, None)
    print(f'survivor exited {time.monotonic() - killed_at:.1f} s after its peer died')
