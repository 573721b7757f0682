"""`python -m wurst_jax.caption` with a tiny random LLaVA built here: one caption per readable image in
the jsonl `image_folder` ingests, unreadable files and empty captions counted, resume after a kill,
and two processes' shards merging to the single-process output."""

import json
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import run_module
from wurst_jax.data import image_folder, vlm_captions

SPECIAL = ['<unk>', '<pad>', '<s>', '</s>', '<image>']
WORDS = 'USER: ASSISTANT: Describe this image and its style in a very detailed manner'.split()
WORDS += [f'w{i}' for i in range(200)]
# LLaVA-1.5's template, as llava-hf's processors carry it.
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    '{% endfor %} {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}'
)
READABLE = ['a.png', 'b.jpg', 'c_rgba.png', 'd_gray16.png', 'e.webp', 'sub/f.png', 'sub/deeper/g.png']
UNREADABLE = ['corrupt.png', 'sub/truncated.png']
MAX_NEW_TOKENS = 6


def tiny_processor(chat_template: str | None = TEMPLATE):
    """A word-level tokenizer with `<image>` special, a 32 px CLIP image processor, and LlavaProcessor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # Joins the words with spaces.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token='<unk>',
        pad_token='<pad>',
        bos_token='<s>',
        eos_token='</s>',
        additional_special_tokens=['<image>'],
    )
    images = CLIPImageProcessor(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32})
    # 4 x 4 patches + CLS, less CLS ('default' strategy): 16 image tokens, as llava-hf's 576 at 336 px.
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy='default',
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
    """A random two-layer CLIP vision tower and two-layer Llama as a transformers LLaVA folder."""
    import torch
    from transformers import CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    path = tmp_path_factory.mktemp('llava')
    vision = CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    text = LlamaConfig(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=SPECIAL.index('<image>'),
        vision_feature_select_strategy='default',
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    # A random LM may emit EOS or another special token (decoded to nothing) first; a real one writes words.
    model.generation_config = GenerationConfig(
        bos_token_id=2, eos_token_id=3, pad_token_id=1, suppress_tokens=list(range(len(SPECIAL)))
    )
    model.save_pretrained(path)
    tiny_processor().save_pretrained(path)
    return path


@pytest.fixture(scope='module')
def captioner(model_dir):
    """The job's captioner over the tiny model, counting the images it is given."""
    inner = vlm_captions.load_captioner(str(model_dir), vlm_captions.DEFAULT_PROMPT, MAX_NEW_TOKENS)

    def counted(images):
        counted.images += len(images)
        return inner(images)

    counted.images = 0
    return counted


def write_images(folder: pathlib.Path) -> pathlib.Path:
    """Readable images of several kinds (a subfolder too), a corrupt and a truncated PNG, and a non-image."""
    rng = np.random.default_rng(0)
    pixels = lambda h, w, c: rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    for name in READABLE + UNREADABLE:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels(40, 24, 3)).save(folder / 'a.png')
    Image.fromarray(pixels(24, 40, 3)).save(folder / 'b.jpg')
    Image.fromarray(pixels(32, 32, 4)).save(folder / 'c_rgba.png')
    Image.fromarray(rng.integers(0, 65536, (30, 30), dtype=np.uint16)).save(folder / 'd_gray16.png')
    Image.fromarray(pixels(32, 48, 3)).save(folder / 'e.webp')
    Image.fromarray(pixels(36, 36, 3)).save(folder / 'sub/f.png')
    Image.fromarray(pixels(20, 20, 3)).save(folder / 'sub/deeper/g.png')
    (folder / 'corrupt.png').write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    Image.fromarray(pixels(64, 64, 3)).save(folder / 'sub/truncated.png')
    whole = (folder / 'sub/truncated.png').read_bytes()
    (folder / 'sub/truncated.png').write_bytes(whole[: len(whole) // 2])
    (folder / 'notes.md').write_text('not an image')
    return folder


@pytest.fixture
def images(tmp_path):
    return write_images(tmp_path / 'images')


def lines(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_captions_every_readable_image_once_in_what_image_folder_ingests(images, model_dir, captioner):
    result = run_module(
        'wurst_jax.caption',
        f'--images={images}',
        f'--model={model_dir}',
        f'--max_new_tokens={MAX_NEW_TOKENS}',
        '--batch_size=3',
        '--device=cpu',
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'written 7 (resumed 0), skipped 2 (2 unreadable, 0 empty captions)' in result.stdout.splitlines()[-1]
    out = images / image_folder.CAPTIONS_JSONL
    records = lines(out)
    assert [r['file'] for r in records] == sorted(READABLE)
    assert all(isinstance(r['caption'], str) and r['caption'].strip() == r['caption'] != '' for r in records)
    report = json.loads((images / 'captions.jsonl.skipped.json').read_text())
    assert report['num_captions'] == 7 and sorted(report['skipped']) == sorted(UNREADABLE)
    assert all(reason.startswith('unreadable image') for reason in report['skipped'].values())

    scan = image_folder.scan_folder(images)
    assert sorted(e.path.relative_to(images).as_posix() for e in scan.entries) == sorted(READABLE)
    assert {e.path.relative_to(images).as_posix(): e.caption for e in scan.entries} == {
        r['file']: r['caption'] for r in records
    }
    # image_folder asks for a caption first, so the two unreadable files are its only skips.
    assert sorted(s.path.relative_to(images).as_posix() for s in scan.skipped) == sorted(UNREADABLE)

    # The in-process job over the same model writes the same captions (greedy decoding, batch size aside).
    again = vlm_captions.caption_shard(images, images / 'again.jsonl', captioner, batch_size=2)
    assert again.written == 7 and (images / 'again.jsonl').read_text() == out.read_text()


def test_a_rerun_resumes_and_a_cut_off_line_is_captioned_again(images, captioner):
    out = images / 'captions.jsonl'
    first = vlm_captions.caption_shard(images, out, captioner, batch_size=4)
    assert (first.written, first.resumed, len(first.skipped), first.merged) == (7, 0, 2, True)
    expected = out.read_text()
    shard = vlm_captions.ShardPaths(out, 0, 1).jsonl

    before = captioner.images
    second = vlm_captions.caption_shard(images, out, captioner, batch_size=4)
    assert (second.written, second.resumed, captioner.images - before) == (0, 7, 0)
    assert out.read_text() == expected

    # Killed mid-line: the last record half written, another one never written.
    text = shard.read_text().splitlines(keepends=True)
    shard.write_text(''.join(text[:2] + text[3:-1]) + text[-1][: len(text[-1]) // 2])
    before = captioner.images
    third = vlm_captions.caption_shard(images, out, captioner, batch_size=4)
    assert (third.written, third.resumed, captioner.images - before) == (2, 5, 2)
    assert out.read_text() == expected
    assert sorted(shard.read_text().splitlines()) == expected.splitlines()  # Appended after the kept lines.


def test_two_processes_merge_to_the_single_process_output(images, tmp_path, captioner):
    single = tmp_path / 'single.jsonl'
    vlm_captions.caption_shard(images, single, captioner, batch_size=2)
    out = tmp_path / 'out' / 'captions.jsonl'
    out.parent.mkdir()

    first = vlm_captions.caption_shard(images, out, captioner, batch_size=2, index=1, count=2)
    assert not first.merged and not out.exists()  # Shard 0 is not done yet.
    second = vlm_captions.caption_shard(images, out, captioner, batch_size=2, index=0, count=2)
    assert second.merged and first.written + second.written == 7
    assert out.read_text() == single.read_text()
    assert json.loads(vlm_captions.skipped_report(out).read_text()) == json.loads(
        vlm_captions.skipped_report(single).read_text()
    )
    shard_files = [{r['file'] for r in lines(vlm_captions.ShardPaths(out, i, 2).jsonl)} for i in range(2)]
    assert not shard_files[0] & shard_files[1]
    every_other = vlm_captions.shard_files(sorted(READABLE + UNREADABLE), 0, 2)
    assert sorted(shard_files[0]) == [f for f in every_other if f in READABLE]

    # --merge alone rebuilds OUT from the shards; a new image makes them stale, so it refuses.
    out.unlink()
    merged = run_module('wurst_jax.caption', f'--images={images}', f'--out={out}', '--merge', '--process_count=2')
    assert merged.returncode == 0 and 'merged 2 shards: 7 captions' in merged.stdout, merged.stderr[-3000:]
    assert out.read_text() == single.read_text()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / 'new.png')
    assert vlm_captions.merge(images, out, 2) is None
    assert vlm_captions.pending_shards(out, 2, vlm_captions.list_images(images)) == [0, 1]


def test_empty_captions_are_counted_not_written(images, tmp_path):
    out = tmp_path / 'captions.jsonl'
    result = vlm_captions.caption_shard(
        images, out, lambda batch: ['' if b.size == (24, 40) else ' x ' for b in batch], 3
    )
    assert result.written == 6 and result.skipped['a.png'] == 'empty caption' and len(result.skipped) == 3
    assert [r['file'] for r in lines(out)] == sorted(set(READABLE) - {'a.png'})
    assert all(r['caption'] == 'x' for r in lines(out))
    assert json.loads(vlm_captions.skipped_report(out).read_text())['skipped']['a.png'] == 'empty caption'


def test_the_prompt_uses_the_chat_template_or_llava_1_5s_format():
    assert vlm_captions.chat_prompt(tiny_processor(), 'Say.') == 'USER: <image>\nSay. ASSISTANT:'
    assert vlm_captions.chat_prompt(tiny_processor(chat_template=None), 'Say.') == 'USER: <image>\nSay. ASSISTANT:'
    assert vlm_captions.DEFAULT_PROMPT == 'Describe this image and its style in a very detailed manner'


def test_without_torch_the_module_imports_and_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError.
    with pytest.raises(ImportError, match=r'pip install -e \.\[caption\]'):
        vlm_captions.load_captioner('unused', vlm_captions.DEFAULT_PROMPT, 8)


def test_process_index_outside_the_count_is_an_error():
    with pytest.raises(ValueError, match='process_index 2'):
        vlm_captions.shard_files(['a', 'b'], 2, 2)
