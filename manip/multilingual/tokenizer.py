"""A CLIP-format BPE tokenizer trained on English and Russian text.

CLIP's BPE runs over words that its regex split off and GPT-2's byte -> character table
rewrote, so a Cyrillic letter is two byte characters (к -> Ðº). Training takes its words from
`CLIPTokenizer`'s own normalizer and pre-tokenizer, so the merges are learnt on exactly the
strings they will be applied to.

The vocabulary is laid out as OpenAI CLIP lays out its own: the 256 byte characters, the same
with the end-of-word mark `</w>`, one token per merge in merge order, then `<|startoftext|>` and
`<|endoftext|>` (also the padding and unknown token, as in the base tokenizer). Because every
byte is a token in both positions, any text encodes, falling back to bytes; the unknown token is
never produced.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, trainers
from transformers import CLIPTokenizer

from manip.models.tokenizer import TINY_MAX_LENGTH, _bytes_to_unicode
from manip.training.checkpoint import atomic_write, replace_dir, staging_dir

END_OF_WORD = "</w>"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BYTE_SYMBOLS: tuple[str, ...] = tuple(_bytes_to_unicode().values())
BASE_TOKENS: tuple[str, ...] = BYTE_SYMBOLS + tuple(b + END_OF_WORD for b in BYTE_SYMBOLS)
MIN_VOCAB_SIZE = len(BASE_TOKENS) + 2
# Room to spare: every word form of EmojiWorld's captions in both languages is one token with
# about 1,150 tokens, and more text may be added.
DEFAULT_VOCAB_SIZE = 4096
MERGES_HEADER = "#version: 0.2"


def clip_words(texts: Iterable[str]) -> list[str]:
    """The byte-mapped words `CLIPTokenizer` runs BPE on: lower-cased, split by CLIP's regex."""
    backend = CLIPTokenizer().backend_tokenizer
    return [
        word
        for text in texts
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(text))
    ]


def train_bpe(words: list[str], n_tokens: int, min_frequency: int = 2) -> Tokenizer:
    """A BPE model over byte-mapped words whose vocabulary grows to at most `n_tokens`.

    The word-final byte symbols are handed to the trainer as its first tokens: left to itself
    it numbers them in the order it meets them in a hash map, and ties between equally
    frequent pairs are broken by those numbers, so the merges would change from run to run.
    As special tokens they could split a word that contains one, but none can occur: CLIP's
    regex never joins the letter w to the punctuation around it.
    """
    trainer = trainers.BpeTrainer(
        vocab_size=n_tokens, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(BASE_TOKENS[len(BYTE_SYMBOLS):]), initial_alphabet=list(BYTE_SYMBOLS),
        end_of_word_suffix=END_OF_WORD,
    )
    bpe = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
    bpe.train_from_iterator(words, trainer)
    return bpe


def merges_of(bpe: Tokenizer) -> list[tuple[str, str]]:
    """Merge rules in the order they were learnt, which is the order they apply in."""
    return [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token -> id in CLIP's layout. Two merges can build the same string; it keeps its first id."""
    tokens = dict.fromkeys([*BASE_TOKENS, *("".join(m) for m in merges), BOS, EOS])
    return {token: i for i, token in enumerate(tokens)}


def build_bilingual_tokenizer(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, max_length: int = TINY_MAX_LENGTH,
    min_frequency: int = 2,
) -> CLIPTokenizer:
    """A tokenizer of at most `vocab_size` tokens; fewer when the texts run out of pairs seen
    `min_frequency` times, which on captions means every word has become one token."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (bytes and special tokens), got {vocab_size}")
    merges = merges_of(train_bpe(clip_words(texts), vocab_size - 2, min_frequency))
    return CLIPTokenizer(vocab=clip_vocab(merges), merges=merges, model_max_length=max_length)


def tokenizer_files(tokenizer: CLIPTokenizer) -> dict[str, str]:
    """The files OpenAI CLIP's tokenizers are shipped as (and that `CLIPTokenizer.from_pretrained`
    reads in any transformers version), with the base tokenizer's settings."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    config = {
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS,
        "model_max_length": tokenizer.model_max_length, "tokenizer_class": "CLIPTokenizer",
    }
    return {
        "vocab.json": json.dumps(model["vocab"], ensure_ascii=False) + "\n",
        "merges.txt": "\n".join([MERGES_HEADER, *(" ".join(pair) for pair in model["merges"])]) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n",
    }


def save_bilingual_tokenizer(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """Write the tokenizer's files into `folder`, which appears whole or not at all."""
    tmp = staging_dir(folder)
    for name, text in tokenizer_files(tokenizer).items():
        atomic_write(tmp / name, text)
    replace_dir(tmp, folder)
