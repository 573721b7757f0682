"""python -m wurst_jax.caption --images=DIR --model=VLM_FOLDER [--out=DIR/captions.jsonl]
   [--prompt=TEXT] [--max_new_tokens=1024] [--batch_size=8] [--device=cuda] [--process_index=I --process_count=N]
python -m wurst_jax.caption --images=DIR --merge --process_count=N [--out=...]

Captions every image under DIR (recursively) with a LLaVA-style vision-language model, the way PixArt-α
recaptioned SAM (LLaVA, "Describe this image and its style in a very detailed manner"), and writes the
`captions.jsonl` that the `image_folder` dataset ingests: one line {"file": path relative to DIR, "caption": str}
per image, sorted by file. The default OUT, DIR/captions.jsonl, is where `image_folder` looks.

A local transformers LLaVA folder on PyTorch (`pip install -e .[caption]`); `wurst_jax/data/vlm_captions.py`
says why, and how the work is split: process I of N takes every N-th image into its own resumable shard,
and the last to finish writes OUT and OUT.skipped.json (unreadable images and empty captions, counted).
Across hosts OUT's folder must be shared; otherwise gather the shards in one place and run with --merge.
Skipped files are tried again on a rerun.
"""

import pathlib

from absl import app, flags

from wurst_jax.data.image_folder import CAPTIONS_JSONL
from wurst_jax.data.vlm_captions import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PROMPT,
    caption_shard,
    list_images,
    load_captioner,
    merge,
    pending_shards,
    skipped_report,
)

_IMAGES = flags.DEFINE_string('images', None, 'Folder of images, searched recursively.')
_MODEL = flags.DEFINE_string('model', None, 'Local transformers LLaVA folder (e.g. llava-hf/llava-1.5-7b-hf).')
_OUT = flags.DEFINE_string('out', None, 'Output jsonl (default: IMAGES/captions.jsonl, what image_folder reads).')
_PROMPT = flags.DEFINE_string('prompt', DEFAULT_PROMPT, 'Instruction given with each image.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', DEFAULT_MAX_NEW_TOKENS, 'Longest caption, in tokens.')
_BATCH = flags.DEFINE_integer('batch_size', 8, 'Images per generate() call.')
_DEVICE = flags.DEFINE_string('device', '', 'torch device (default: cuda if available, else cpu).')
_PROCESS_INDEX = flags.DEFINE_integer('process_index', 0, 'This process, 0..process_count-1.')
_PROCESS_COUNT = flags.DEFINE_integer('process_count', 1, 'Processes splitting the images.')
_MERGE = flags.DEFINE_bool('merge', False, 'Only assemble OUT from complete shards (no model).')
flags.mark_flags_as_required(['images'])


def main(argv):
    del argv
    folder = pathlib.Path(_IMAGES.value).expanduser()
    if not folder.is_dir():
        raise SystemExit(f'--images={_IMAGES.value}: not a directory')
    out = pathlib.Path(_OUT.value).expanduser() if _OUT.value else folder / CAPTIONS_JSONL
    count = _PROCESS_COUNT.value
    if _MERGE.value:
        written = merge(folder, out, count)
        if written is None:
            missing = pending_shards(out, count, list_images(folder.resolve()))
            raise SystemExit(f'cannot merge into {out}: shards {missing} of {count} are missing or incomplete')
        print(f'merged {count} shards: {written} captions in {out}, skipped files in {skipped_report(out)}')
        return
    if not _MODEL.value:
        raise SystemExit('--model=FOLDER is required (a local transformers LLaVA folder), unless --merge')
    try:
        captioner = load_captioner(_MODEL.value, _PROMPT.value, _MAX_NEW_TOKENS.value, _DEVICE.value)
    except ImportError as e:
        raise SystemExit(str(e)) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    result = caption_shard(folder, out, captioner, _BATCH.value, _PROCESS_INDEX.value, count)
    empty = sum(reason == 'empty caption' for reason in result.skipped.values())
    merged = f'wrote {out}' if result.merged else f'{out} is written when all {count} shards are done'
    print(
        f'shard {_PROCESS_INDEX.value} of {count}: written {result.written} (resumed {result.resumed}), '
        f'skipped {len(result.skipped)} ({len(result.skipped) - empty} unreadable, {empty} empty captions); {merged}'
    )


if __name__ == '__main__':
    app.run(main)
