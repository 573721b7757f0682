"""grain input pipeline over TFDS ArrayRecord sources: training and evaluation iterators.

Batches are dicts of numpy arrays for this process: `image` float32 [B, S, S, 3] in [-1, 1],
`id` int64 [B], `caption` str [B], and with a tokenizer `tokens`, `token_mask` int32 [B, L]. With
`input.aspect_buckets` each training batch is [B, h, w, 3] for one bucket (h, w) of
`aspect_buckets.py` and carries `original_size` [B, 2] and `aspect_ratio` [B, 1].
"""

import contextlib
import dataclasses
import fcntl
import io
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from wurst_jax.data import aspect_buckets, image_folder, photos, precomputed, shapes

BUILTIN_DATASETS = ('shapes', 'photos', 'image_folder')
REQUIRED_FEATURES = ('image', 'caption')
# Batching happens before to_iter_dataset, so each thread builds a whole batch and the buffer
# counts batches: grain's defaults (16 threads, 500 elements) would hold 500 batches.
_READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=4)


# --- Sources -----------------------------------------------------------------------------------


def builtin_builder(input_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The TFDS builder of a built-in dataset ('shapes', 'photos', 'image_folder')."""
    name, data_dir = input_config.dataset, input_config.data_dir
    if name == 'shapes':
        config = shapes.shapes_config(
            image_size=input_config.image_size,
            num_train=input_config.shapes.num_train,
            num_test=input_config.shapes.num_test,
            seed=input_config.shapes.seed,
            # Absent from configs (and saved runs) that set input.shapes before the filters existed.
            hold_out=input_config.shapes.get('hold_out', ''),
            only=input_config.shapes.get('only', ''),
        )
        return shapes.Shapes(config=config, data_dir=data_dir)
    if name == 'photos':
        return photos.Photos(data_dir=data_dir)
    if name == 'image_folder':
        config = image_folder.image_folder_config(input_config.folder)
        return image_folder.ImageFolder(config=config, data_dir=data_dir)
    raise ValueError(f'input.dataset={name!r} is not a built-in dataset {BUILTIN_DATASETS}')


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """Holds an exclusive advisory lock on `path` (created if needed) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w') as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def prepare_builtin(input_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """Writes a built-in dataset as ArrayRecord under data_dir unless it is already there."""
    builder = builtin_builder(input_config)
    if builder.is_prepared():
        # This builder may have been made while another process was still writing the dataset, and
        # then read no metadata (it would take the files for TFRecord): a new one reads them.
        return builtin_builder(input_config)
    # Processes sharing a data_dir would race on tfds' final rename; the first one builds, the
    # others wait and then find the dataset prepared.
    lock = pathlib.Path(builder.data_dir_root) / f'.{builder.info.full_name.replace("/", "-")}.lock'
    with _file_lock(lock):
        # A builder made before another process finished has no split metadata: make a new one.
        builder = builtin_builder(input_config)
        if not builder.is_prepared():
            builder.download_and_prepare(file_format='array_record')
    return builder


def _prepare_hint(name: str, data_dir: str) -> str:
    """How to prepare a TFDS dataset so this pipeline can read it."""
    return (
        f'prepare it first, e.g. `tfds build {name} --data_dir={data_dir} '
        f'--file_format=array_record` or tfds.builder({name!r}, data_dir={data_dir!r})'
        ".download_and_prepare(file_format='array_record'); the pipeline never downloads"
    )


def prepared_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """The builder of a TFDS dataset already prepared in ArrayRecord form under data_dir."""
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        raise FileNotFoundError(
            f'TFDS dataset {name!r} not found in data_dir {data_dir!r}: {_prepare_hint(name, data_dir)}'
        ) from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f'TFDS dataset {name!r} is not prepared in data_dir {data_dir!r} '
            f'(looked in {builder.data_dir}): {_prepare_hint(name, data_dir)}'
        )
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(
            f'TFDS dataset {name!r} in {builder.data_dir} is stored as '
            f'{builder.info.file_format}, not ArrayRecord: '
            f'{_prepare_hint(name, data_dir)}'
        )
    missing = [f for f in REQUIRED_FEATURES if f not in builder.info.features]
    if missing:
        raise ValueError(f'TFDS dataset {name!r} lacks the features {missing}; it has {sorted(builder.info.features)}')
    return builder


def get_source(input_config: ml_collections.ConfigDict, split: str) -> Sequence[dict]:
    """Random-access source of `split`: dicts with encoded `image` bytes, `caption`, maybe `id`."""
    if input_config.dataset in BUILTIN_DATASETS:
        builder = prepare_builtin(input_config)
    else:
        builder = prepared_builder(input_config.dataset, input_config.data_dir)
    # Decoding is left to the pipeline, so it runs in grain's threads/workers with PIL.
    source = builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})
    if len(source) == 0:
        raise ValueError(f'split {split!r} of dataset {input_config.dataset!r} in {builder.data_dir} is empty')
    return source


# --- Per-example transforms -----------------------------------------------------------------


def decode_image(data: bytes) -> Image.Image:
    """Encoded image bytes as an 8-bit RGB PIL image."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert('RGB')


def resize_shorter_side(image: Image.Image, target: int) -> Image.Image:
    """Scales so the shorter side is `target` (bicubic; PIL widens the kernel when shrinking)."""
    width, height = image.size
    scale = target / min(width, height)
    size = (max(target, round(width * scale)), max(target, round(height * scale)))
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def resize_to_cover(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scales, keeping the aspect ratio, to the smallest size that covers width x height (bicubic)."""
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def center_crop_offset(width: int, height: int, size: int, crop_height: int | None = None) -> tuple[int, int]:
    """(left, top) of the centred size x size (or size x crop_height) window."""
    return (width - size) // 2, (height - (crop_height or size)) // 2


def random_crop_offset(
    width: int, height: int, size: int, rng: np.random.Generator, crop_height: int | None = None
) -> tuple[int, int]:
    """(left, top) of a uniformly placed size x size (or size x crop_height) window."""
    return int(rng.integers(width - size + 1)), int(rng.integers(height - (crop_height or size) + 1))


def to_signed_unit(image: Image.Image) -> np.ndarray:
    """uint8 RGB image as float32 [H, W, 3] in [-1, 1]."""
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


def _as_str(value: bytes | str) -> str:
    """TFDS Text comes back as bytes without TensorFlow."""
    return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _attach_id(index: int, example: dict) -> dict:
    """Uses the record index as `id` for datasets without an id feature."""
    return example if 'id' in example else {**example, 'id': index}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preprocess:
    """Decode, resize the shorter side, crop to image_size, maybe flip, scale to [-1, 1]; with a
    tokenizer, also the caption's `tokens` and `token_mask` (int32 [L]).

    With a bucket table, an example that names its `bucket` is resized to cover that bucket's
    (h, w) and cropped to it, and every example carries PixArtMS's micro-conditions: its decoded
    `original_size` (h, w) and the `aspect_ratio` of its crop (the bucket's ratio; 1 for a square).
    """

    image_size: int
    resize: int
    random_crop: bool = False
    flip: bool = False
    tokenizer: Any = None
    buckets: tuple[tuple[float, int, int], ...] | None = None

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        """One example as {'image': float32 [S, S, 3] (or the bucket's [h, w, 3]), 'id': int64, 'caption': str}."""
        image = decode_image(example['image'])
        original_size = np.array(image.size[::-1], np.float32)
        if 'bucket' in example:
            ratio, h, w = self.buckets[example['bucket']]
            image = resize_to_cover(image, w, h)
        else:
            ratio, h, w = 1.0, self.image_size, self.image_size
            image = resize_shorter_side(image, self.resize)
        if self.random_crop:
            left, top = random_crop_offset(*image.size, w, rng, h)
        else:
            left, top = center_crop_offset(*image.size, w, h)
        image = image.crop((left, top, left + w, top + h))
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out = {'image': to_signed_unit(image), 'id': np.int64(example['id']), 'caption': _as_str(example['caption'])}
        if self.buckets is not None:
            out.update(original_size=original_size, aspect_ratio=np.array([ratio], np.float32))
        if self.tokenizer is not None:
            encoded = self.tokenizer(out['caption'])
            out['tokens'], out['token_mask'] = encoded['input_ids'][0], encoded['attention_mask'][0]
        return out


def make_preprocess(input_config: ml_collections.ConfigDict, *, train: bool, tokenizer: Any = None) -> Preprocess:
    """The per-example transform; evaluation always centre-crops and never flips."""
    resize = input_config.resize or input_config.image_size
    if resize < input_config.image_size:
        raise ValueError(
            f'input.resize={resize} is below input.image_size='
            f'{input_config.image_size}; the crop is taken after resizing'
        )
    buckets = (
        aspect_buckets.bucket_table(input_config.image_size, input_config.get('bucket_multiple', 0))
        if input_config.get('aspect_buckets', False)
        else None
    )
    return Preprocess(
        image_size=input_config.image_size,
        resize=resize,
        random_crop=train and input_config.crop == 'random',
        flip=train and bool(input_config.flip),
        tokenizer=tokenizer,
        buckets=buckets,
    )


# --- Iterators -----------------------------------------------------------------------------------


def local_batch_size(batch_size: int, process_count: int) -> int:
    """This process's share of the global batch."""
    if batch_size % process_count:
        raise ValueError(
            f'input.batch_size={batch_size} (global) is not divisible by the process count {process_count}'
        )
    return batch_size // process_count


def _mark_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags, which are unparsed outside absl.app.run."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _precomputed_source(input_config: ml_collections.ConfigDict, split: str) -> Sequence[bytes]:
    """The records `python -m wurst_jax.precompute` wrote for `split`."""
    return grain.sources.ArrayRecordDataSource(precomputed.shard_paths(input_config.precomputed, split))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodePrecomputed:
    """A precomputed record as an example; with a tokenizer (a trained text encoder), its caption's tokens."""

    tokenizer: Any = None

    def __call__(self, record: bytes) -> dict:
        out = precomputed.decode_record(record)
        if self.tokenizer is not None and 'text_states' not in out:
            encoded = self.tokenizer(out['caption'])
            out['tokens'], out['token_mask'] = encoded['input_ids'][0], encoded['attention_mask'][0]
        return out


class _ProcessShard(grain.MapDataset):
    """Process p's share of each global batch: its k-th batch is global elements
    [k·B + p·b, k·B + (p + 1)·b) (B global, b local), so the global batch lists the same examples in
    the same row order whatever the process count, and so pairs them with the same noise."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        self._global, self._local = global_batch, global_batch // process_count
        self._offset = process_index * self._local

    def __len__(self) -> int:
        return len(self._parent) // self._global * self._local

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, row = divmod(index, self._local)
        return self._parent[step * self._global + self._offset + row]


@dataclasses.dataclass(frozen=True)
class _Fetch:
    """A planned {'index', 'bucket'} as the record it names, with the bucket."""

    source: Sequence[dict]

    def __call__(self, planned: dict) -> dict:
        return {**_attach_id(planned['index'], self.source[planned['index']]), 'bucket': planned['bucket']}


def _bucketed_examples(input_config: ml_collections.ConfigDict, seed: int, tokenizer: Any) -> grain.MapDataset:
    """The endless global stream of augmented examples, each global batch from one aspect bucket."""
    source = get_source(input_config, input_config.train_split)
    preprocess = make_preprocess(input_config, train=True, tokenizer=tokenizer)
    buckets = [aspect_buckets.closest_bucket(h, w, preprocess.buckets) for h, w in aspect_buckets.image_sizes(source)]
    order = aspect_buckets.BucketedOrder(np.array(buckets), input_config.batch_size, seed)
    return order.seed(seed).map(_Fetch(source)).random_map(preprocess)


def create_train_iterator(
    input_config: ml_collections.ConfigDict, *, seed: int, process_index: int, process_count: int, tokenizer: Any = None
) -> grain.DatasetIterator:
    """Endless, checkpointable iterator over this process's augmented training batches (or over
    precomputed records when input.precomputed names them)."""
    batch = local_batch_size(input_config.batch_size, process_count)
    if input_config.get('precomputed'):
        source = _precomputed_source(input_config, input_config.train_split)
        ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat().map(DecodePrecomputed(tokenizer=tokenizer))
    elif input_config.get('aspect_buckets', False):
        ds = _bucketed_examples(input_config, seed, tokenizer)
    else:
        source = get_source(input_config, input_config.train_split)
        ds = (
            grain.MapDataset.source(source)
            .map_with_index(_attach_id)
            .seed(seed)
            .shuffle()  # Global shuffle, reseeded each epoch by the repeat below.
            .repeat()
            # Seeded by the position in the global stream, ahead of the shard, so an element's crop
            # and flip do not depend on the process count. MapDataset is lazy: only this process's
            # elements are decoded.
            .random_map(make_preprocess(input_config, train=True, tokenizer=tokenizer))
        )
    ds = (
        _ProcessShard(ds, input_config.batch_size, process_index, process_count)
        .batch(batch, drop_remainder=True)
        .to_iter_dataset(_READ_OPTIONS)
    )
    if input_config.num_workers > 0:
        _mark_absl_flags_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=input_config.num_workers))
    return iter(ds)


def create_eval_iterator(
    input_config: ml_collections.ConfigDict,
    *,
    split: str,
    batch_size: int,
    num_examples: int | None = None,
    tokenizer: Any = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict]:
    """Deterministic batches of the first `num_examples` of `split` (every process_count-th of them
    from process_index on), the last one possibly short."""
    if input_config.get('precomputed'):
        source, transform = _precomputed_source(input_config, split), DecodePrecomputed(tokenizer=tokenizer)
        ds = grain.MapDataset.source(source)
    else:
        source, transform = (
            get_source(input_config, split),
            make_preprocess(input_config, train=False, tokenizer=tokenizer),
        )
        ds = grain.MapDataset.source(source).map_with_index(_attach_id)
    count = len(source) if num_examples is None else min(num_examples, len(source))
    ds = ds[:count][process_index::process_count].map(transform).batch(batch_size, drop_remainder=False)
    return iter(ds.to_iter_dataset(_READ_OPTIONS))


def eval_batches(config: ml_collections.ConfigDict, tokenizer: Any = None) -> Iterator[dict] | list[dict]:
    """The held-out batches a run evaluates and draws its image grid from, as config.eval.data names
    them: 'astronaut_tiles' (crops of skimage's astronaut photo, the Stage A reconstruction check),
    else the first config.eval.num_examples of config.input.eval_split."""
    if config.eval.data == 'astronaut_tiles':
        tiles = photos.astronaut_crops(config.input.image_size).astype(np.float32) / 127.5 - 1
        return [dict(image=tiles[i : i + config.eval.batch_size]) for i in range(0, len(tiles), config.eval.batch_size)]
    return create_eval_iterator(
        config.input,
        split=config.input.eval_split,
        batch_size=config.eval.batch_size,
        num_examples=config.eval.num_examples,
        tokenizer=tokenizer,
    )
