"""`image_folder`: a user's local folder of captioned images, ingested into ArrayRecord.

Captions come from `captions.jsonl` in the folder (lines {"file": relative path, "caption": str})
or from a `.txt` file with the image's stem beside it; the jsonl wins when both exist. Images that
cannot be decoded, and images without a caption, are skipped and listed in `skipped.json` beside
the prepared dataset.
"""

import dataclasses
import hashlib
import json
import logging
import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from wurst_jax.data.captioned import CaptionedImageBuilder, encode_png

IMAGE_SUFFIXES = frozenset({'.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff'})
CAPTIONS_JSONL = 'captions.jsonl'
REPORT_NAME = 'skipped.json'
# Transparent pixels keep arbitrary colour values; compositing onto white is the usual convention
# for cut-out product shots and hides that garbage.
ALPHA_BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({'I;16', 'I;16L', 'I;16B', 'I;16N', 'I'})


@dataclasses.dataclass(frozen=True)
class Entry:
    """An image that passed validation, with its caption."""

    path: pathlib.Path
    caption: str


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A file left out of the dataset, and why."""

    path: pathlib.Path
    reason: str


@dataclasses.dataclass(frozen=True)
class FolderScan:
    """The result of scanning a folder: usable entries and skipped files."""

    folder: pathlib.Path
    entries: tuple[Entry, ...]
    skipped: tuple[Skipped, ...]

    def report(self) -> dict:
        """JSON-ready summary: counts per reason and each skipped path with its reason."""
        counts: dict[str, int] = {}
        for s in self.skipped:
            kind = s.reason.split(':')[0]
            counts[kind] = counts.get(kind, 0) + 1
        return {
            'folder': str(self.folder),
            'num_examples': len(self.entries),
            'num_skipped': len(self.skipped),
            'skipped_by_reason': counts,
            'skipped': [{'path': str(s.path), 'reason': s.reason} for s in self.skipped],
        }


def _read_jsonl_captions(folder: pathlib.Path) -> dict[pathlib.Path, str]:
    """Captions from `captions.jsonl`, keyed by resolved path; empty if there is no such file."""
    jsonl = folder / CAPTIONS_JSONL
    if not jsonl.exists():
        return {}
    try:
        text = jsonl.read_text(encoding='utf-8')
    except UnicodeDecodeError as e:
        raise ValueError(f'{jsonl} is not UTF-8 text ({e}): save it as UTF-8, one JSON object a line') from None
    captions = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            captions[(folder / record['file']).resolve()] = str(record['caption'])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f'{jsonl}:{line_no}: expected {{"file": ..., "caption": ...}}, got {line!r} ({e})') from e
    return captions


def _caption_for(path: pathlib.Path, jsonl_captions: dict[pathlib.Path, str]) -> str | None:
    """The image's caption from the jsonl or its `.txt` sidecar; None if absent or blank."""
    caption = jsonl_captions.get(path.resolve())
    sidecar = path.with_suffix('.txt')
    if caption is None and sidecar.exists():
        caption = sidecar.read_text(encoding='utf-8')
    if caption is None or not caption.strip():
        return None
    return caption.strip()


def _image_problem(path: pathlib.Path) -> str | None:
    """Why the image cannot be used, or None if it decodes completely."""
    if path.stat().st_size == 0:
        return 'empty file'
    try:
        with Image.open(path) as image:
            image.load()  # Decodes every pixel, so truncated files fail here, not at train time.
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        kind = 'truncated image' if 'truncated' in str(e).lower() else 'unreadable image'
        return f'{kind}: {e}'
    return None


def scan_folder(folder: str | pathlib.Path) -> FolderScan:
    """Finds images under `folder` (recursively), validates them and pairs them with captions."""
    folder = pathlib.Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise ValueError(f'image folder {str(folder)!r} does not exist or is not a directory')
    jsonl_captions = _read_jsonl_captions(folder)
    entries, skipped = [], []
    images = sorted(p for p in folder.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    for path in images:
        caption = _caption_for(path, jsonl_captions)
        problem = 'missing caption' if caption is None else _image_problem(path)
        if problem is None:
            entries.append(Entry(path, caption))
        else:
            skipped.append(Skipped(path, problem))
    missing = sorted(set(jsonl_captions) - {p.resolve() for p in images})
    skipped.extend(Skipped(p, f'listed in {CAPTIONS_JSONL} but no such image') for p in missing)
    return FolderScan(folder, tuple(entries), tuple(skipped))


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) grayscale to 8-bit 'L', scaled by the full range, not clipped."""
    values = np.clip(np.asarray(image, dtype=np.float64), 0, None)
    full_scale = 65535.0 if values.max() <= 65535 else 2.0**31 - 1
    return Image.fromarray(np.round(values / full_scale * 255).astype(np.uint8))


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16-bit scaled down, alpha composited, palettes expanded."""
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _scale_to_8bit(image)
    if image.mode == 'P':
        image = image.convert('RGBA' if 'transparency' in image.info else 'RGB')
    if image.mode in ('RGBA', 'LA', 'PA'):
        rgba = image.convert('RGBA')
        background = Image.new('RGBA', rgba.size, ALPHA_BACKGROUND + (255,))
        image = Image.alpha_composite(background, rgba)
    return image.convert('RGB')


def encoded_image(path: pathlib.Path) -> bytes:
    """Stored bytes: the original file for upright 8-bit RGB JPEGs, else PNG of the RGB image."""
    with Image.open(path) as image:
        upright = image.getexif().get(0x0112, 1) == 1  # EXIF orientation tag; 1 = no rotation.
        if image.format == 'JPEG' and image.mode == 'RGB' and upright:
            return path.read_bytes()
        rgb = to_rgb8(ImageOps.exif_transpose(image))
    return encode_png(np.asarray(rgb))


def _folder_fingerprint(folder: pathlib.Path) -> str:
    """Hash of the folder path and its files' names, sizes and mtimes: any change, a new build."""
    digest = hashlib.sha1(str(folder).encode())
    for path in sorted(p for p in folder.rglob('*') if p.is_file()):
        stat = path.stat()
        digest.update(f'{path.relative_to(folder)}|{stat.st_size}|{stat.st_mtime_ns}\n'.encode())
    return digest.hexdigest()[:12]


@dataclasses.dataclass(eq=False, kw_only=True)
class ImageFolderConfig(tfds.core.BuilderConfig):
    """Which folder to ingest."""

    folder: str = ''


def image_folder_config(folder: str | pathlib.Path) -> ImageFolderConfig:
    """A config named after the folder and a fingerprint of its contents, so edits rebuild."""
    path = pathlib.Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise ValueError(f'image folder {str(path)!r} does not exist or is not a directory')
    slug = re.sub(r'[^a-z0-9]+', '_', path.name.lower()).strip('_') or 'root'
    return ImageFolderConfig(name=f'{slug}_{_folder_fingerprint(path)}', folder=str(path))


class ImageFolder(CaptionedImageBuilder):
    """Captioned images from a local folder; everything valid goes to the `train` split."""

    def _split_generators(self, dl_manager):
        scan = scan_folder(self.builder_config.folder)
        report = scan.report()
        # During preparation data_path is tfds' temporary directory, renamed into place on success.
        (self.data_path / REPORT_NAME).write_text(json.dumps(report, indent=2))
        if scan.skipped:
            logging.warning(
                'image_folder %s: %d images kept, %d skipped %s; the list is in %s '
                'in the prepared dataset directory (%s/%s/%s)',
                scan.folder,
                len(scan.entries),
                len(scan.skipped),
                report['skipped_by_reason'],
                REPORT_NAME,
                self.name,
                self.builder_config.name,
                self.version,
            )
        if not scan.entries:
            raise ValueError(
                f'image folder {str(scan.folder)!r} holds no usable images: expected image files '
                f'({", ".join(sorted(IMAGE_SUFFIXES))}) each with a caption in a same-stem .txt '
                f'file or in {CAPTIONS_JSONL}; skipped {report["skipped_by_reason"]}'
            )
        return {'train': self._generate_examples(scan.entries)}

    def _generate_examples(self, entries: tuple[Entry, ...]):
        for index, entry in enumerate(entries):
            yield index, {'image': encoded_image(entry.path), 'caption': entry.caption, 'id': index}
