"""Dense captions for a folder of images from a local LLaVA-style vision-language model, written as the
`captions.jsonl` the `image_folder` dataset ingests (`python -m wurst_jax.caption` is the command line).

The model runs on transformers' LLaVA classes over PyTorch, not JAX: the released captioners
(llava-hf/llava-1.5-7b-hf and the like) ship as transformers folders, and batched generation with a KV cache
is what that library does well. torch and transformers are optional: `pip install -e .[caption]`.

Sharding: the sorted image list is split by stride, process I taking images I, I+N, I+2N, ... . Each process
appends to its own shard OUT.part-IIIII-of-NNNNN (flushed after every batch, so a killed job loses at most
one batch; rerunning resumes from it, ignoring a line cut off mid-write) and, when its slice is done, writes
OUT.part-IIIII-of-NNNNN.skipped.json: the files it skipped (unreadable images, empty captions) and a
fingerprint of the image list. That file marks the shard complete; whichever process finds all N complete
for the current image list (the last to finish) writes OUT and OUT.skipped.json.
"""

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator

from PIL import Image, ImageOps

from wurst_jax.data.image_folder import IMAGE_SUFFIXES, to_rgb8

# PixArt-α's prompt (the paper, section 2.4). Its released tool (tools/VLM_caption_lightning.py) asks for
# "Describe this image in a very detailed manner" and allows 1024 new tokens, sampling at temperature 0.2.
DEFAULT_PROMPT = 'Describe this image and its style in a very detailed manner'
DEFAULT_MAX_NEW_TOKENS = 1024
# LLaVA-1.5's conversation format, for processors saved without a chat template.
FALLBACK_TEMPLATE = 'USER: <image>\n{prompt} ASSISTANT:'
INSTALL_HINT = 'captioning needs torch and transformers: pip install -e .[caption]'

Captioner = Callable[[list[Image.Image]], list[str]]


@dataclasses.dataclass(frozen=True)
class ShardPaths:
    """Where process `index` of `count` writes its captions and its completion marker."""

    out: pathlib.Path
    index: int
    count: int

    @property
    def jsonl(self) -> pathlib.Path:
        """The shard's captions, appended batch by batch."""
        return self.out.with_name(f'{self.out.name}.part-{self.index:05d}-of-{self.count:05d}')

    @property
    def done(self) -> pathlib.Path:
        """Written last: the shard's skip list and image-list fingerprint."""
        return self.jsonl.with_name(self.jsonl.name + '.skipped.json')


@dataclasses.dataclass(frozen=True)
class ShardResult:
    """What one process did: new and resumed captions, skipped files, and whether it wrote OUT."""

    written: int
    resumed: int
    skipped: dict[str, str]
    merged: bool


def list_images(folder: pathlib.Path) -> list[str]:
    """Image paths under `folder` relative to it, sorted: the files `image_folder` would read."""
    paths = (p for p in folder.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(p.relative_to(folder).as_posix() for p in paths)


def fingerprint(files: list[str]) -> str:
    """Hash of the image list: shards made for another list are not merged with this one."""
    return hashlib.sha1('\n'.join(files).encode()).hexdigest()[:16]


def shard_files(files: list[str], index: int, count: int) -> list[str]:
    """Process `index`'s share: every `count`-th file, so each process gets a mix of subfolders."""
    if not 0 <= index < count:
        raise ValueError(f'process_index {index} is not in 0..{count - 1} (process_count {count})')
    return files[index::count]


def read_captions(path: pathlib.Path) -> dict[str, str]:
    """{file: caption} from a jsonl; lines that do not parse (a write cut off by a kill) are dropped."""
    if not path.exists():
        return {}
    captions = {}
    for line_no, line in enumerate(path.read_text(encoding='utf-8', errors='replace').splitlines(), start=1):
        try:
            record = json.loads(line)
            captions[str(record['file'])] = str(record['caption'])
        except (json.JSONDecodeError, KeyError, TypeError):
            if line.strip():
                logging.warning('%s:%d: dropping incomplete line %r (captioned again)', path, line_no, line)
    return captions


def write_jsonl(path: pathlib.Path, captions: dict[str, str]) -> None:
    """Replaces `path` atomically with one line per caption, sorted by file."""
    tmp = path.with_name(f'{path.name}.tmp.{os.getpid()}')  # Per process: two may merge at once.
    with open(tmp, 'w', encoding='utf-8') as f:
        f.writelines(_line(file, captions[file]) for file in sorted(captions))
    os.replace(tmp, path)


def write_json(path: pathlib.Path, value: dict) -> None:
    """Replaces `path` atomically, so a reader never sees half a report."""
    tmp = path.with_name(f'{path.name}.tmp.{os.getpid()}')
    tmp.write_text(json.dumps(value, indent=1, ensure_ascii=False), encoding='utf-8')
    os.replace(tmp, path)


def _line(file: str, caption: str) -> str:
    """One captions.jsonl line."""
    return json.dumps({'file': file, 'caption': caption}, ensure_ascii=False) + '\n'


def open_rgb(path: pathlib.Path) -> Image.Image | str:
    """The image upright in 8-bit RGB as `image_folder` stores it, or why it cannot be read."""
    try:
        with Image.open(path) as image:
            image.load()  # Decodes every pixel, so truncated files fail here.
            return to_rgb8(ImageOps.exif_transpose(image))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return f'unreadable image: {e}'


def _readable(folder: pathlib.Path, files: Iterable[str], skipped: dict[str, str]) -> Iterator[tuple[str, Image.Image]]:
    """(file, image) for the files that decode; the others go into `skipped`."""
    for file in files:
        image = open_rgb(folder / file)
        if isinstance(image, str):
            logging.warning('skipping %s: %s', file, image)
            skipped[file] = image
        else:
            yield file, image


def _batches(items: Iterator, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def caption_shard(
    folder: pathlib.Path, out: pathlib.Path, captioner: Captioner, batch_size: int, index: int = 0, count: int = 1
) -> ShardResult:
    """Captions process `index`'s share of `folder` into its shard, resuming it; merges if all shards are done."""
    if batch_size < 1:
        raise ValueError(f'batch_size must be at least 1, got {batch_size}')
    folder = folder.resolve()
    files = list_images(folder)
    paths = ShardPaths(out, index, count)
    paths.done.unlink(missing_ok=True)  # Incomplete until this run finishes, so nobody merges it meanwhile.
    mine = shard_files(files, index, count)
    assigned = set(mine)
    done = {f: c for f, c in read_captions(paths.jsonl).items() if f in assigned}
    write_jsonl(paths.jsonl, done)  # Drops a cut-off last line, so appends start on a fresh line.
    skipped: dict[str, str] = {}
    written = 0
    with open(paths.jsonl, 'a', encoding='utf-8') as f:
        for batch in _batches(_readable(folder, (m for m in mine if m not in done), skipped), batch_size):
            captions = captioner([image for _, image in batch])
            for (file, _), caption in zip(batch, captions, strict=True):
                if caption.strip():
                    f.write(_line(file, caption.strip()))
                    written += 1
                else:
                    logging.warning('skipping %s: the model returned an empty caption', file)
                    skipped[file] = 'empty caption'
            f.flush()
            os.fsync(f.fileno())  # A killed (or crashed) job loses at most this batch.
            logging.info('%d of %d images captioned', len(done) + written + len(skipped), len(mine))
    write_json(paths.done, {'fingerprint': fingerprint(files), 'skipped': skipped})
    merged = merge(folder, out, count, files=files) is not None
    return ShardResult(written=written, resumed=len(done), skipped=skipped, merged=merged)


def pending_shards(out: pathlib.Path, count: int, files: list[str]) -> list[int]:
    """Shards not yet complete for this image list."""
    want = fingerprint(files)
    pending = []
    for index in range(count):
        done = ShardPaths(out, index, count).done
        if not done.exists() or json.loads(done.read_text(encoding='utf-8')).get('fingerprint') != want:
            pending.append(index)
    return pending


def merge(folder: pathlib.Path, out: pathlib.Path, count: int, files: list[str] | None = None) -> int | None:
    """Writes OUT and OUT.skipped.json from all `count` shards; the number of captions, or None if some are missing."""
    files = list_images(folder.resolve()) if files is None else files
    if pending_shards(out, count, files):
        return None
    listed = set(files)
    captions: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for index in range(count):
        paths = ShardPaths(out, index, count)
        captions.update((f, c) for f, c in read_captions(paths.jsonl).items() if f in listed)
        skipped.update(json.loads(paths.done.read_text(encoding='utf-8'))['skipped'])
    # Two processes finishing together may both merge; each writes the same bytes through an atomic rename.
    write_jsonl(out, captions)
    report = {'num_captions': len(captions), 'num_skipped': len(skipped), 'skipped': dict(sorted(skipped.items()))}
    write_json(skipped_report(out), report)
    return len(captions)


def skipped_report(out: pathlib.Path) -> pathlib.Path:
    """OUT.skipped.json: every file left out, with why."""
    return out.with_name(out.name + '.skipped.json')


def chat_prompt(processor, prompt: str) -> str:
    """`prompt` after an image in one user turn, through the processor's chat template or LLaVA-1.5's format."""
    if getattr(processor, 'chat_template', None):
        conversation = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': prompt}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return FALLBACK_TEMPLATE.format(prompt=prompt)


def load_captioner(model_dir: str, prompt: str, max_new_tokens: int, device: str = '') -> Captioner:
    """A function from images to greedy captions, with the LLaVA model in `model_dir` (no downloads)."""
    try:  # Optional: only captioning needs them (the `caption` extra).
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration
    except ImportError as e:
        raise ImportError(f'{INSTALL_HINT} ({e})') from e

    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    dtype = torch.float16 if device.startswith('cuda') else torch.float32  # LLaVA's released weights are fp16.
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, local_files_only=True, dtype=dtype).to(device)
    model.eval()
    tokenizer = processor.tokenizer
    tokenizer.padding_side = 'left'  # Generation continues from the right end of every row.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    text = chat_prompt(processor, prompt)

    def captioner(images: list[Image.Image]) -> list[str]:
        inputs = processor(images=images, text=[text] * len(images), return_tensors='pt', padding=True).to(device)
        inputs['pixel_values'] = inputs['pixel_values'].to(dtype)
        with torch.inference_mode():
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id)
        new = ids[:, inputs['input_ids'].shape[1] :]  # Only the generated tokens, not the prompt.
        return [c.strip() for c in processor.batch_decode(new, skip_special_tokens=True)]

    return captioner
