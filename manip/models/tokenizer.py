"""A Hugging Face `CLIPTokenizer` built from the BPE vocabulary the open_clip wheel ships.

Stable Diffusion's tokenizer is OpenAI CLIP's BPE; open_clip carries the same merges file,
so converting it gives token ids identical to the real SD 1.x tokenizer with no download.
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

from transformers import CLIPTokenizer

N_MERGES = 49152 - 256 - 2
MAX_LENGTH = 77  # position embeddings of the text encoders (as in CLIP)
TINY_MAX_LENGTH = 32  # prompt length of the tiny model: every EmojiWorld caption fits in 28 tokens


OPEN_CLIP_HINT = (
    "install it with `pip install --no-deps open-clip-torch` "
    "(its torchvision dependency breaks the CPU torch build)"
)


def open_clip_dir() -> Path:
    """The installed open_clip package folder, found without importing the package (its
    `__init__` needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the open_clip package is not installed; {OPEN_CLIP_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def open_clip_vocab_path() -> Path:
    path = open_clip_dir() / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall open_clip: {OPEN_CLIP_HINT}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's BPE is defined over."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def read_bpe(bpe_gz: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Token -> id table and merge rules, in the order OpenAI CLIP assigns ids."""
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : N_MERGES + 1]]
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(bpe_gz: Path | None = None, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    vocab, merges = read_bpe(bpe_gz or open_clip_vocab_path())
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
