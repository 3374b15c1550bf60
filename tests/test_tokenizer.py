"""The CLIP tokenizer built from open_clip's BPE file agrees with open_clip's own tokenizer."""
from __future__ import annotations


import pytest
import torch
from transformers import CLIPTokenizer

from manip.models.factory import BOS_ID, EOS_ID, VOCAB_SIZE
from manip.models.tokenizer import MAX_LENGTH, TINY_MAX_LENGTH, build_clip_tokenizer
from manip.world import SPLITS, all_captions, sample_scene, scene_rng

from conftest import open_clip_reference_tokenizer

PLAIN_TEXTS = [
    "a photo of a cat",
    "A Photo Of A Cat",
    "an astronaut riding a horse on the moon, highly detailed, 4k",
    "Hello, World! How's it going?",
    "don't stop believin' -- we're here, they'll see",
    "numbers 12345 and 3.14159",
    "multiple    spaces\tand\nnewlines",
    "hyphenated pixel-art and night-time",
    "unusual wordpieces: antidisestablishmentarianism, photosynthesis",
    "café naïve résumé",
    "emoji 🐱 and symbols #@$%",
    "",
]


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    """open_clip's reference `SimpleTokenizer`, loaded by file path: importing the `open_clip`
    package pulls in torchvision, which the CPU environment does not have."""
    return open_clip_reference_tokenizer().SimpleTokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer() -> CLIPTokenizer:
    return build_clip_tokenizer()


def reference_ids(ref, text: str, context_length: int = MAX_LENGTH) -> list[int]:
    row = ref(text, context_length=context_length)[0].tolist()
    return row[: row.index(EOS_ID) + 1]


def hf_ids(tok: CLIPTokenizer, text: str) -> list[int]:
    ids = tok(text, truncation=True, max_length=MAX_LENGTH).input_ids
    return ids[: ids.index(EOS_ID) + 1]


def world_captions() -> list[str]:
    return [c for split in SPLITS for i in range(25) for c in all_captions(sample_scene(scene_rng(0, split, i), split))]


def test_vocab_and_special_tokens(hf_tokenizer, open_clip_tokenizer):
    assert len(hf_tokenizer) == VOCAB_SIZE == open_clip_tokenizer.vocab_size
    assert hf_tokenizer.bos_token_id == BOS_ID == open_clip_tokenizer.sot_token_id
    assert hf_tokenizer.eos_token_id == EOS_ID == open_clip_tokenizer.eot_token_id
    assert hf_tokenizer.model_max_length == MAX_LENGTH


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_ids_match_open_clip_on_plain_text(hf_tokenizer, open_clip_tokenizer, text):
    ours, ref = hf_ids(hf_tokenizer, text), reference_ids(open_clip_tokenizer, text)
    assert ours[0] == BOS_ID and ours[-1] == EOS_ID
    assert ours == ref


def test_ids_match_open_clip_on_world_captions(hf_tokenizer, open_clip_tokenizer):
    captions = world_captions()
    assert len(set(captions)) > 100
    for text in captions:
        assert hf_ids(hf_tokenizer, text) == reference_ids(open_clip_tokenizer, text), text


def test_world_captions_fit_tiny_context(hf_tokenizer):
    longest = max(len(hf_tokenizer(c).input_ids) for c in world_captions())
    assert longest <= TINY_MAX_LENGTH


def test_truncation_ends_with_eos(hf_tokenizer, open_clip_tokenizer):
    text = " ".join(["cat"] * 100)
    ours = hf_tokenizer(text, truncation=True, max_length=MAX_LENGTH).input_ids
    assert len(ours) == MAX_LENGTH and ours[-1] == EOS_ID
    assert ours == open_clip_tokenizer(text)[0].tolist()


def test_save_pretrained_round_trip(tmp_path, open_clip_tokenizer):
    tok = build_clip_tokenizer(max_length=TINY_MAX_LENGTH)
    tok.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert loaded.model_max_length == TINY_MAX_LENGTH
    assert len(loaded) == VOCAB_SIZE
    texts = PLAIN_TEXTS + world_captions()[:40]
    kwargs = dict(padding="max_length", max_length=TINY_MAX_LENGTH, truncation=True, return_tensors="pt")
    a, b = tok(texts, **kwargs).input_ids, loaded(texts, **kwargs).input_ids
    assert a.shape == (len(texts), TINY_MAX_LENGTH)
    assert torch.equal(a, b)
    # Padding is with the end token, as the tiny text encoder's pad_token_id says.
    assert (a[PLAIN_TEXTS.index("a photo of a cat"), 6:] == EOS_ID).all()
