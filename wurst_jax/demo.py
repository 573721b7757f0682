"""python -m wurst_jax.demo --workdir=DIR [--stage_b=tokens]

The whole system on the built-in `shapes` dataset: builds it, trains Stage A, then Stage B (with
the semantic compressor; `--stage_b=tokens`: Würstchen v1's Paella over Stage A's codes instead of
v2's diffusion decoder), then Stage C (configs/shapes.py with `demo`), samples a fixed prompt
list into DIR/samples/grid.png and scores text alignment of fresh prompts with the shapes
detector into DIR/alignment.json. Rerunning skips finished stages and resumes an interrupted
one. `python -m wurst_jax.sample --workdir=DIR` then samples any prompts.
"""

import importlib.util
import json
import os
import time

import numpy as np
from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string('workdir', 'workdirs/shapes', 'Run root: stage_a/, stage_b/, stage_c/, samples/.')
_DATA_DIR = flags.DEFINE_string('data_dir', 'data', 'Where the shapes dataset is written.')
_NUM_EVAL = flags.DEFINE_integer('num_eval_prompts', 200, 'Fresh prompts scored for alignment.')
_RUNLOCAL = flags.DEFINE_bool('runlocal', False, 'Tiny models and a few steps (tests).')
_STAGE_B = flags.DEFINE_enum(
    'stage_b',
    'diffusion',
    ['diffusion', 'tokens'],
    "Stage B: Würstchen v2's diffusion decoder or v1's token predictor (Paella).",
)
_CONFIG_FILE = flags.DEFINE_string('config_file', 'configs/shapes.py', 'The config file with stage=a|b|c variants.')

STAGES = ('a', 'b', 'c')
GRID_PROMPTS = (
    'a red circle on the left',
    'a blue square on the right',
    'a green triangle at the top',
    'a yellow circle at the bottom',
    'a white square in the center',
    'a magenta triangle on the left',
    'a cyan circle at the top and a red square at the bottom',
    'a blue triangle on the left and a yellow circle on the right',
)


def stage_config(stage: str, root: str):
    spec = importlib.util.spec_from_file_location('demo_config', _CONFIG_FILE.value)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    arg = f'stage={stage},root={root},' + ('runlocal' if _RUNLOCAL.value else 'demo')
    if stage == 'b' and _STAGE_B.value == 'tokens':
        arg += ',tokens'
    config = module.get_config(arg)
    config.input.data_dir = _DATA_DIR.value
    return config


def check_resumable(config, workdir: str) -> None:
    """SystemExit unless `workdir` holds no checkpoint or one of this same stage config (paths aside:
    the data folder and the earlier stages' workdirs may move), which then resumes: another config's
    (a run started with or without --runlocal, say) would not restore into this one's state."""
    from flax import traverse_util

    from wurst_jax import checkpoint

    saved = checkpoint.saved_config(workdir)
    if saved is None:
        return
    # Dotted field -> value of each config's JSON form (tuples as lists, as a checkpoint saves them).
    ours, theirs = (traverse_util.flatten_dict(json.loads(c.to_json()), sep='.') for c in (config, saved))
    changed = sorted(
        k
        for k in ours.keys() | theirs.keys()
        if k != 'input.data_dir' and not k.endswith('.source') and ours.get(k) != theirs.get(k)
    )
    if changed:
        shown = ', '.join(f'{k} {theirs.get(k)!r} there, {ours.get(k)!r} now' for k in changed[:3])
        raise SystemExit(
            f'{workdir} holds a run of another config ({shown}{", ..." if len(changed) > 3 else ""}): '
            'rerun with the flags that started it (--runlocal, --config_file) to resume it, '
            'or give a new --workdir'
        )


def main(argv):
    del argv
    from wurst_jax import checkpoint, tasks, train, visualize
    from wurst_jax.data import shapes
    from wurst_jax.evaluate import shapes_alignment
    from wurst_jax.pipeline import Pipeline

    root = os.path.abspath(_WORKDIR.value)
    timings = {}
    for stage in STAGES:
        config = stage_config(stage, root)
        tasks.validate(config)
        workdir = os.path.join(root, f'stage_{stage}')
        check_resumable(config, workdir)
        if max(checkpoint.all_steps(workdir), default=0) >= config.total_steps:
            logging.info('stage %s already trained in %s', stage, workdir)
            continue
        start = time.time()
        train.train_and_evaluate(config, workdir)
        timings[f'stage_{stage}_s'] = round(time.time() - start, 1)

    start = time.time()
    pipeline = Pipeline.from_root(root)
    samples = os.path.join(root, 'samples')
    os.makedirs(samples, exist_ok=True)
    grid_images = pipeline(list(GRID_PROMPTS), seed=0)
    visualize.save_png(
        os.path.join(samples, 'grid.png'), visualize.image_grid(grid_images.astype(np.float32) / 127.5 - 1, ncols=4)
    )
    prompts = shapes.fresh_captions(_NUM_EVAL.value)
    images = pipeline(prompts, seed=1, batch_size=16)
    alignment = shapes_alignment.evaluate(images, prompts)
    timings['sampling_s'] = round(time.time() - start, 1)
    with open(os.path.join(root, 'alignment.json'), 'w') as f:
        json.dump(dict(alignment, **timings), f, indent=1)
    print(f'stages under {root}/stage_{{a,b,c}}; sample grid {samples}/grid.png')
    print(f'alignment on {len(prompts)} fresh prompts: ' + json.dumps(alignment))
    print(f'timings: {json.dumps(timings)}')
    print(f'more images: python -m wurst_jax.sample --workdir={root} --prompts=FILE --out=OUT')


if __name__ == '__main__':
    app.run(main)
