"""python -m wurst_jax.export --workdir=RUN --out=DIR [--merge]

Writes a trained run's network as a diffusers folder: DIR/prior (WuerstchenPrior, or DIR/transformer for
PixArt), DIR/decoder (WuerstchenDiffNeXt) or DIR/vqgan (PaellaVQModel), from the EMA weights. A Würstchen
prior run whose text encoder is a CLIP folder becomes a whole WuerstchenPriorPipeline folder (its
text_encoder, tokenizer, scheduler and model_index.json beside the prior; diffusers 0.42's pipeline
from_pretrained cannot resolve the deprecated WuerstchenPrior class, so there build the pipeline from each
folder's from_pretrained). A run root with stage_a/,
stage_b/ and stage_c/ (`wurst_jax.demo`) is written stage by stage under DIR/<stage>.

From a LoRA run (lora.rank > 0) it writes DIR/pytorch_lora_weights.safetensors, the adapters in the
peft-style keys `WuerstchenPriorPipeline.load_lora_weights` reads (`convert/lora.py`); `--merge` writes
the base with the adapters folded in instead, as for a full fine-tune.
"""

import json
import os
import shutil

import jax
import ml_collections
from absl import app, flags
from safetensors.numpy import save_file

from wurst_jax import checkpoint, convert, lora, tasks
from wurst_jax.convert import core
from wurst_jax.convert import lora as lora_format
from wurst_jax.tasks import formats
from wurst_jax.tasks.lora_task import LoraTask

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained run, or a root of stage_a/, stage_b/, stage_c/ runs.')
_OUT = flags.DEFINE_string('out', None, 'Output folder.')
_MERGE = flags.DEFINE_bool('merge', False, 'A LoRA run: write the base with the adapters merged, not the adapters.')
flags.mark_flags_as_required(['workdir', 'out'])

STAGES = ('stage_a', 'stage_b', 'stage_c')


def _write_prior_pipeline(config: ml_collections.ConfigDict, out: str) -> None:
    """The rest of a WuerstchenPriorPipeline folder around out/prior: the CLIP text encoder and
    tokenizer the run read, the scheduler, and model_index.json."""
    text = config.text
    if not (os.path.isdir(text.encoder) and os.path.isdir(text.tokenizer or text.encoder)):
        print(f'{out}/prior written; no pipeline folder: the text encoder is not a CLIP folder ({text.encoder!r})')
        return
    shutil.copytree(text.encoder, os.path.join(out, 'text_encoder'), dirs_exist_ok=True)
    shutil.copytree(text.tokenizer or text.encoder, os.path.join(out, 'tokenizer'), dirs_exist_ok=True)
    header = {'_diffusers_version': core.DIFFUSERS_VERSION}
    os.makedirs(os.path.join(out, 'scheduler'), exist_ok=True)
    with open(os.path.join(out, 'scheduler', 'scheduler_config.json'), 'w') as f:
        json.dump({'_class_name': 'DDPMWuerstchenScheduler', **header, 'scaler': 1.0, 's': 0.008}, f, indent=2)
    # The pipeline un-scales the prior's output as latents · mean − std: v2's (x + 1) / 42 is mean 42, std 1.
    mean, std = (42.0, 1.0) if config.latent_scaling == 'v2' else (1.0, 0.0)
    index = {
        '_class_name': 'WuerstchenPriorPipeline',
        **header,
        'latent_mean': mean,
        'latent_std': std,
        'resolution_multiple': 42.67,
        # As the pipeline's own save_pretrained writes it (diffusers 0.42 then cannot resolve the class, which
        # moved to pipelines.deprecated: load DIR's folders with each class's from_pretrained there).
        'prior': ['diffusers', 'WuerstchenPrior'],
        'scheduler': ['diffusers', 'DDPMWuerstchenScheduler'],
        'text_encoder': ['transformers', 'CLIPTextModel'],
        'tokenizer': ['transformers', 'CLIPTokenizer'],
    }
    with open(os.path.join(out, 'model_index.json'), 'w') as f:
        json.dump(index, f, indent=2)


def export_run(workdir: str, out: str, merge: bool = False) -> list[str]:
    """Writes one run's export under `out`; returns the paths written."""
    config = checkpoint.saved_config(workdir)
    if config is None:
        raise FileNotFoundError(f'{workdir} has no checkpoint: train it first, or give the run folder itself')
    task = tasks.create(config)
    params = jax.device_get(checkpoint.load_params(workdir, ema=True))
    inner = task.inner if isinstance(task, LoraTask) else task
    network, module, component, folder = formats.diffusers_network(inner)
    os.makedirs(out, exist_ok=True)
    if isinstance(task, LoraTask) and not merge:
        base = task.base()[network]
        adapters = params['lora'][network]
        state = lora_format.to_diffusers(module, component, base, adapters, task.scale, folder)
        path = os.path.join(out, lora_format.LORA_WEIGHTS)
        save_file(state, path, metadata={'format': 'pt'})
        return [path]
    if isinstance(task, LoraTask):
        params = jax.device_get(lora.merge(task.base(), params['lora'], task.scale))
    path = os.path.join(out, folder)
    convert.save_diffusers(module, {'params': params[network]}, path, component)
    if component == 'prior':
        _write_prior_pipeline(config, out)
    return [path]


def export(workdir: str, out: str, merge: bool = False) -> list[str]:
    """A run, or a root of stage runs (each under out/<stage>)."""
    if os.path.isdir(os.path.join(workdir, 'checkpoints')):
        return export_run(workdir, out, merge)
    stages = [s for s in STAGES if os.path.isdir(os.path.join(workdir, s, 'checkpoints'))]
    if not stages:
        raise FileNotFoundError(f'{workdir} holds no run (checkpoints/) and no {"/, ".join(STAGES)}/ runs')
    return [p for s in stages for p in export_run(os.path.join(workdir, s), os.path.join(out, s), merge)]


def main(argv):
    del argv
    try:
        written = export(_WORKDIR.value, _OUT.value, _MERGE.value)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'--workdir={_WORKDIR.value}: {e}') from None
    print('wrote ' + ', '.join(written))


if __name__ == '__main__':
    app.run(main)
