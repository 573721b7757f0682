"""Tokenizers: the CLIP or T5 tokenizer of a local Hugging Face model folder (through the `tokenizers`
library), and two that need no vocabulary file, for small encoders trained from scratch: whole
words of a vocabulary given in the config (a closed caption language such as the built-in
dataset's grammar), and UTF-8 bytes (any text).

    tokenizer = PaddedTokenizer.from_folder('/models/wuerstchen-prior/tokenizer')
    batch = tokenizer(['a photo of a cat'])   # {'input_ids': int32 [1, 77], 'attention_mask': int32 [1, 77]}

A CLIP folder gives what transformers' `tokenizer(texts, padding='max_length', max_length=77,
truncation=True)` gives: BOS, the BPE tokens, EOS, then the folder's pad token (CLIP-ViT-H and bigG
folders differ: `!` or `<|endoftext|>`, so it is read from the folder, never assumed). A T5 folder
(PixArt-α: max_length 120) gives what T5TokenizerFast gives: the SentencePiece pieces, `</s>` (its
tokenizer.json's post-processor appends it), then `<pad>` (id 0), which a folder holding only
tokenizer.json, without tokenizer_config.json, is taken to pad with. A folder with only the
SentencePiece model (`spiece.model`) must be saved once by transformers to get its tokenizer.json.
"""

import dataclasses
import json
import os
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

TOKENIZER_FILE = 'tokenizer.json'
WORD_SPECIALS = ('<pad>', '<bos>', '<eos>', '<unk>')
T5_PAD = '<pad>'  # T5's pad token (id 0), also the decoder's start token
_SENTENCEPIECE_FILE = 'spiece.model'
_CONFIG_FILES = ('tokenizer_config.json', 'special_tokens_map.json')


def _token_text(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {'content': ...}."""
    return token.get('content') if isinstance(token, dict) else token


def _pad_token(path: str, tokenizer: Tokenizer) -> str:
    for name in _CONFIG_FILES:
        config_path = os.path.join(path, name)
        if os.path.isfile(config_path):
            with open(config_path) as f:
                pad = _token_text(json.load(f).get('pad_token'))
            if pad is not None:
                return pad
    if tokenizer.padding is not None:
        return tokenizer.padding['pad_token']
    if tokenizer.token_to_id(T5_PAD) is not None:  # a bare T5 tokenizer.json (CLIP's vocabulary has no <pad>)
        return T5_PAD
    raise ValueError(f'no pad_token in {path}: looked in {", ".join(_CONFIG_FILES)} and {TOKENIZER_FILE}')


@dataclasses.dataclass(frozen=True)
class PaddedTokenizer:
    """A `tokenizers.Tokenizer` whose outputs are truncated (keeping EOS) and padded to max_length."""

    tokenizer: Tokenizer
    pad_token: str
    max_length: int = 77

    @classmethod
    def from_words(cls, vocabulary: Sequence[str], max_length: int) -> 'PaddedTokenizer':
        """[<bos>, lowercase words (unknown ones -> <unk>), <eos>, <pad>...], ids 0-3 for the specials."""
        words = sorted({w.lower() for w in vocabulary} - set(WORD_SPECIALS))
        vocab = {t: i for i, t in enumerate((*WORD_SPECIALS, *words))}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
        tokenizer.normalizer = normalizers.Lowercase()
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.post_processor = processors.TemplateProcessing(
            single='<bos> $A <eos>', special_tokens=[('<bos>', 1), ('<eos>', 2)]
        )
        return cls._padded(tokenizer, '<pad>', max_length)

    @classmethod
    def _padded(cls, tokenizer: Tokenizer, pad_token: str, max_length: int) -> 'PaddedTokenizer':
        tokenizer.enable_truncation(max_length, direction='right')
        tokenizer.enable_padding(
            direction='right', pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token, length=max_length
        )
        return cls(tokenizer, pad_token, max_length)

    @classmethod
    def from_folder(cls, path: str, max_length: int = 77) -> 'PaddedTokenizer':
        """Reads path/tokenizer.json and the pad token of path/tokenizer_config.json (or special_tokens_map.json)."""
        tokenizer_path = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(tokenizer_path):
            hint = ''
            if os.path.isfile(os.path.join(path, _SENTENCEPIECE_FILE)):
                hint = (
                    f'; the folder holds only {_SENTENCEPIECE_FILE}: write its {TOKENIZER_FILE} once with '
                    f'transformers.T5TokenizerFast.from_pretrained(folder).save_pretrained(folder)'
                )
            raise FileNotFoundError(
                f'{TOKENIZER_FILE} not found in tokenizer folder {path}: expected a '
                f'Hugging Face tokenizer saved by save_pretrained ({tokenizer_path}){hint}'
            )
        tokenizer = Tokenizer.from_file(tokenizer_path)
        pad_token = _pad_token(path, tokenizer)
        if tokenizer.token_to_id(pad_token) is None:
            raise ValueError(f'pad token {pad_token!r} of {path} is not in its vocabulary')
        return cls._padded(tokenizer, pad_token, max_length)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def eos_token_id(self) -> int | None:
        """The id the encoder pools at (the word vocabulary's <eos>; None for a CLIP folder, whose
        text encoder config names its own)."""
        return self.tokenizer.token_to_id('<eos>')

    def __call__(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        """texts -> input_ids, attention_mask: int32 [N, max_length] (right-padded, truncated with EOS kept)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        encodings = self.tokenizer.encode_batch(texts)
        return {
            'input_ids': np.array([e.ids for e in encodings], np.int32),
            'attention_mask': np.array([e.attention_mask for e in encodings], np.int32),
        }


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then BOS 256, EOS 257, PAD 258: [BOS, bytes..., EOS, PAD...].

    Same call contract as PaddedTokenizer; truncation keeps the EOS, which the encoder pools.
    """

    max_length: int = 77
    bos_token_id: int = 256
    eos_token_id: int = 257
    pad_token_id: int = 258
    vocab_size: int = 259

    def __call__(self, texts: str | Sequence[str]) -> dict[str, np.ndarray]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = np.full((len(texts), self.max_length), self.pad_token_id, np.int32)
        mask = np.zeros((len(texts), self.max_length), np.int32)
        for row, text in enumerate(texts):
            body = list(text.encode('utf-8'))[: self.max_length - 2]
            tokens = [self.bos_token_id, *body, self.eos_token_id]
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
        return {'input_ids': ids, 'attention_mask': mask}


def create_tokenizer(
    name: str, max_length: int = 77, vocabulary: Sequence[str] = ()
) -> 'ByteTokenizer | PaddedTokenizer':
    """'bytes', 'words' (of `vocabulary`), else a local Hugging Face CLIP or T5 tokenizer folder."""
    if name == 'bytes':
        return ByteTokenizer(max_length)
    if name == 'words':
        return PaddedTokenizer.from_words(vocabulary, max_length)
    return PaddedTokenizer.from_folder(name, max_length)
