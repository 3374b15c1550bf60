"""Russian captions, prompt language detection and the bilingual CLIP-format tokenizer."""
from __future__ import annotations

import gzip
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import emoji
import pytest
import torch
from transformers import AutoTokenizer, CLIPTokenizer

from manip.models.tokenizer import TINY_MAX_LENGTH
from manip.multilingual import (
    N_PHRASINGS_RU, LanguageError, all_captions_ru, bilingual_captions, build_bilingual_tokenizer, caption_ru,
    detect_language, fold_yo, save_bilingual_tokenizer,
)
from manip.multilingual.language import letter_script
from manip.multilingual.russian import (
    BACKGROUNDS_RU, COLOURS_RU, NOT_FROM_EMOJI, OBJECTS_RU, SLOTS_RU, STYLES_RU, TIMES_RU, Adjective,
    object_phrase_ru,
)
from manip.multilingual.tokenizer import (
    MIN_VOCAB_SIZE, clip_words, merges_of, tokenizer_files, train_bpe,
)
from manip.world import SPLITS, Placed, Scene, sample_scene, scene_rng
from manip.world.vocab import ALL_STYLES, BACKGROUNDS, COLOURS, OBJECTS, SLOTS, TIMES

from conftest import open_clip_reference_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SEED, HELD_OUT_SEED = 0, 1


def is_cyrillic_phrase(text: str) -> bool:
    """Cyrillic letters, with spaces and hyphens between words."""
    letters = [c for c in text if c not in " -"]
    return bool(letters) and all(letter_script(c) == "CYRILLIC" for c in letters)


def sampled_scenes(seed: int, n_per_split: int) -> list[Scene]:
    return [sample_scene(scene_rng(seed, split, i), split) for split in SPLITS for i in range(n_per_split)]


# --- Russian vocabulary and captions -------------------------------------------------------------

def test_object_table_covers_every_object_in_cyrillic():
    assert list(OBJECTS_RU) == list(OBJECTS)  # reserved concepts included
    for word, noun in OBJECTS_RU.items():
        assert is_cyrillic_phrase(noun.word), word
        assert noun.gender in ("m", "f", "n", "pl"), word


def test_attribute_tables_cover_the_world_vocabulary():
    assert set(COLOURS_RU) == set(COLOURS) - {"natural"}
    assert list(BACKGROUNDS_RU) == list(BACKGROUNDS)
    assert list(TIMES_RU) == list(TIMES)
    assert list(SLOTS_RU) == list(SLOTS)
    assert list(STYLES_RU) == list(ALL_STYLES)
    phrases = [*SLOTS_RU.values(), *STYLES_RU.values()]
    phrases += [form for adjective in COLOURS_RU.values() for form in adjective]
    phrases += [part for bg in BACKGROUNDS_RU.values() for part in (bg.place, bg.noun)]
    phrases += [t.adverb for t in TIMES_RU.values()] + [f for t in TIMES_RU.values() for f in t.adjective]
    assert all(is_cyrillic_phrase(p) for p in phrases), [p for p in phrases if not is_cyrillic_phrase(p)]


def emoji_russian_name(short_name: str) -> str:
    char = emoji.emojize(f":{short_name}:", language="alias")
    assert char in emoji.EMOJI_DATA, short_name
    return emoji.EMOJI_DATA[char]["ru"].strip(":").replace("_", " ")


def test_object_names_come_from_the_emoji_package_unless_overridden():
    emoji.config.load_language("ru")
    names = {word: emoji_russian_name(short) for word, short in OBJECTS.items()}
    taken = [w for w in OBJECTS if w not in NOT_FROM_EMOJI]
    assert {w: OBJECTS_RU[w].word for w in taken} == {w: names[w] for w in taken}
    # An override that came to agree with the package would be stale.
    assert all(OBJECTS_RU[w].word != names[w] for w in NOT_FROM_EMOJI)


@pytest.mark.parametrize("name,colour,expected", [
    ("cat", "red", "красная кошка"), ("car", "red", "красная машина"), ("apple", "red", "красное яблоко"),
    ("grapes", "green", "зеленый виноград"), ("dog", "blue", "синяя собака"), ("tree", "blue", "синее дерево"),
    ("crab", "blue", "синий краб"), ("carrot", "yellow", "желтая морковь"),
    ("balloon", "purple", "фиолетовый воздушный шарик"), ("horse", "natural", "лошадь"),
])
def test_colour_agrees_with_the_noun(name, colour, expected):
    assert object_phrase_ru(Placed(name, colour, "right")) == f"{expected} справа"
    assert object_phrase_ru(Placed(name, colour, "center"), slot_first=True) == f"в центре {expected}"


def test_adjectives_have_a_plural_form():
    assert COLOURS_RU["red"].agree("pl") == "красные"
    assert isinstance(TIMES_RU["night"].adjective, Adjective)
    assert TIMES_RU["night"].adjective.agree("pl") == "ночные"


def test_caption_phrasings_of_a_two_object_scene():
    scene = Scene("beach", "night", "sketch", (Placed("car", "blue", "right"), Placed("cat", "red", "left")))
    assert all_captions_ru(scene) == [
        "набросок карандашом: красная кошка слева и синяя машина справа, на пляже ночью",
        "красная кошка слева и синяя машина справа на пляже ночью, набросок карандашом",
        "на пляже ночью: слева красная кошка, справа синяя машина, набросок карандашом",
        "ночной пляж, красная кошка слева и синяя машина справа, набросок карандашом",
    ]


@pytest.mark.parametrize("background,time,expected", [
    ("snow", "day", "солнечное снежное поле, яблоко в центре"),
    ("grass", "sunset", "закатная лужайка, яблоко в центре"),
    ("sky", "night", "ночное небо, яблоко в центре"),
    ("city", "day", "солнечный город, яблоко в центре"),
])
def test_time_adjective_agrees_with_the_background(background, time, expected):
    scene = Scene(background, time, "photo", (Placed("apple", "natural", "center"),))
    assert caption_ru(scene, 3) == expected
    place = f"{BACKGROUNDS_RU[background].place} {TIMES_RU[time].adverb}"
    assert caption_ru(scene, 0) == f"фотография: яблоко в центре, {place}"


def test_captions_of_sampled_scenes_say_every_attribute():
    for scene in sampled_scenes(TRAIN_SEED, 50):
        captions = all_captions_ru(scene)
        assert len(captions) == len(set(captions)) == N_PHRASINGS_RU
        for phrasing, text in enumerate(captions):
            assert detect_language(text) == "ru" and "ё" not in text, text
            for obj in scene.objects:
                assert OBJECTS_RU[obj.name].word in text and SLOTS_RU[obj.slot] in text, text
            if phrasing != 3:
                assert BACKGROUNDS_RU[scene.background].place in text and TIMES_RU[scene.time].adverb in text
            assert (STYLES_RU[scene.style] in text) == (phrasing == 0 or scene.style != "photo"), text


def test_unknown_phrasing_is_refused():
    scene = sample_scene(scene_rng(TRAIN_SEED, "train", 0), "train")
    with pytest.raises(ValueError, match="phrasing"):
        caption_ru(scene, N_PHRASINGS_RU)


def test_fold_yo_matches_caption_spelling():
    assert fold_yo("Зелёный ёж, ЁЛКА") == "Зеленый еж, ЕЛКА"


# --- Language detection --------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,language", [
    ("a photo of a cat on the beach", "en"), ("Café naïve, pixel-art!", "en"), ("ＣＡＴ at night", "en"),
    ("Красная кошка слева на пляже ночью", "ru"), ("пиксель-арт: ёж, 2 шт.", "ru"),
    ("a <teapot> on the beach", "en"), ("<teapot> на пляже ночью", "ru"), ("<кот> in the city", "en"),
    ("<teapot>", "en"), ("42 🐱!", "en"),
])
def test_detect_language(prompt, language):
    assert detect_language(prompt) == language


@pytest.mark.parametrize("prompt,fragments", [
    ("", ["empty"]), (" \t\n", ["empty"]),
    ("кошка on the beach", ["'кошка'", "'on'", "'beach'", "one language"]),
    ("sks кошка на пляже", ["'sks'", "<sks>"]),
    ("кoт на пляже", ["'кoт'", "CYRILLIC and LATIN"]),  # Latin o inside a Russian word
    ("一只猫在海滩上", ["CJK", "一只猫在海滩上"]), ("قطة على الشاطئ", ["ARABIC", "'قطة'"]),
    ("γάτα στην παραλία", ["GREEK", "'γάτα'"]), ("a cat, γάτα", ["GREEK", "'γάτα'"]),
])
def test_detect_language_errors_name_the_problem(prompt, fragments):
    with pytest.raises(LanguageError) as err:
        detect_language(prompt)
    assert isinstance(err.value, ValueError)
    for fragment in fragments:
        assert fragment in str(err.value)


# --- Bilingual tokenizer -------------------------------------------------------------------------

TRAIN_PER_SPLIT = 250
HELD_OUT_PER_SPLIT = 750  # 3,000 scenes, 24,000 captions


@pytest.fixture(scope="module")
def train_texts() -> list[str]:
    return bilingual_captions(TRAIN_SEED, TRAIN_PER_SPLIT)


@pytest.fixture(scope="module")
def tokenizer(train_texts) -> CLIPTokenizer:
    return build_bilingual_tokenizer(train_texts)


@pytest.fixture(scope="module")
def held_out_texts() -> dict[str, list[str]]:
    texts = bilingual_captions(HELD_OUT_SEED, HELD_OUT_PER_SPLIT)
    by_language: dict[str, list[str]] = {"en": [], "ru": []}
    for text in texts:
        by_language[detect_language(text)].append(text)
    return by_language


def test_corpus_holds_both_languages(train_texts):
    languages = Counter(detect_language(t) for t in train_texts)
    assert languages == {"en": len(train_texts) // 2, "ru": len(train_texts) // 2}


def test_special_tokens_mirror_the_base_tokenizer(tokenizer):
    assert tokenizer.model_max_length == TINY_MAX_LENGTH
    assert tokenizer.convert_ids_to_tokens([len(tokenizer) - 2, len(tokenizer) - 1]) == [
        "<|startoftext|>", "<|endoftext|>",
    ]
    assert tokenizer.bos_token_id == len(tokenizer) - 2
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == tokenizer.unk_token_id == len(tokenizer) - 1


@pytest.mark.parametrize("language", ["en", "ru"])
def test_held_out_captions_fit_the_tiny_context(tokenizer, held_out_texts, language):
    ids = tokenizer(held_out_texts[language]).input_ids
    assert max(len(row) for row in ids) <= TINY_MAX_LENGTH
    assert all(row[0] == tokenizer.bos_token_id and row[-1] == tokenizer.eos_token_id for row in ids)


@pytest.mark.parametrize("language", ["en", "ru"])
def test_caption_words_are_whole_tokens(tokenizer, held_out_texts, language):
    model = tokenizer.backend_tokenizer.model
    pieces = Counter(len(model.tokenize(word)) for word in set(clip_words(held_out_texts[language])))
    assert sum(pieces.values()) > 50
    assert pieces[1] >= 0.95 * sum(pieces.values()) and max(pieces) <= 2, pieces


def test_tokenizes_as_the_trained_model(tokenizer, train_texts, held_out_texts):
    bpe = train_bpe(clip_words(train_texts), len(tokenizer) - 2)
    assert merges_of(bpe) == [tuple(m.split()) for m in tokenizer_files(tokenizer)["merges.txt"].splitlines()[1:]]
    assert set(tokenizer.get_vocab()) - {"<|startoftext|>", "<|endoftext|>"} == set(bpe.get_vocab())
    words = clip_words(held_out_texts["en"][:500] + held_out_texts["ru"][:500] + ["антидизестаблишментарианизм!"])
    for word in set(words):
        expected = [t.value for t in bpe.model.tokenize(word)]
        assert [t.value for t in tokenizer.backend_tokenizer.model.tokenize(word)] == expected, word


def test_equally_frequent_pairs_merge_in_byte_order():
    """Without the word-final symbols numbered up front, the trainer orders these ties by hash
    map iteration, which changes from one process (and one training) to the next."""
    endings = "bcdefghijklmnop"
    merges = merges_of(train_bpe(["a" + c for c in endings], MIN_VOCAB_SIZE - 2 + len(endings), min_frequency=1))
    assert merges == [("a", c + "</w>") for c in endings]


def test_vocab_size_is_an_upper_bound(train_texts):
    assert len(build_bilingual_tokenizer(train_texts, vocab_size=700)) == 700
    with pytest.raises(ValueError, match="vocab_size"):
        build_bilingual_tokenizer(train_texts, vocab_size=MIN_VOCAB_SIZE - 1)


def test_unknown_characters_fall_back_to_bytes(tokenizer):
    text = "Кошка 🐱 中文 ñ ع ∑ — ok"
    ids = tokenizer(text).input_ids
    assert tokenizer.eos_token_id not in ids[1:-1]  # the unknown token is the end token
    assert tokenizer.decode(ids, skip_special_tokens=True) == text.lower()


def test_same_texts_give_the_same_files(tokenizer, train_texts, tmp_path):
    save_bilingual_tokenizer(tokenizer, tmp_path / "a")
    save_bilingual_tokenizer(build_bilingual_tokenizer(train_texts), tmp_path / "b")
    script = (
        "import sys; from pathlib import Path; "
        "from manip.multilingual import bilingual_captions, build_bilingual_tokenizer, save_bilingual_tokenizer; "
        f"save_bilingual_tokenizer(build_bilingual_tokenizer(bilingual_captions({TRAIN_SEED}, {TRAIN_PER_SPLIT})), "
        "Path(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "c")], cwd=ROOT, check=True)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    for other in ("b", "c"):
        assert sorted(p.name for p in (tmp_path / other).iterdir()) == names
        assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / other / n).read_bytes() for n in names), other


def test_saved_files_load_with_clip_tokenizer(tokenizer, held_out_texts, tmp_path):
    save_bilingual_tokenizer(tokenizer, tmp_path)
    texts = held_out_texts["en"][:200] + held_out_texts["ru"][:200] + ["Hello, World! Привет, мир!", ""]
    kwargs = dict(padding="max_length", max_length=TINY_MAX_LENGTH, truncation=True, return_tensors="pt")
    expected = tokenizer(texts, **kwargs).input_ids
    for loader in (CLIPTokenizer, AutoTokenizer):
        loaded = loader.from_pretrained(tmp_path)
        assert isinstance(loaded, CLIPTokenizer)
        assert len(loaded) == len(tokenizer) and loaded.model_max_length == TINY_MAX_LENGTH
        assert loaded.pad_token_id == loaded.eos_token_id == tokenizer.eos_token_id
        assert torch.equal(loaded(texts, **kwargs).input_ids, expected)


def test_matches_the_openai_reference_implementation(tokenizer, held_out_texts, tmp_path):
    """open_clip's pure-Python port of OpenAI's BPE reads the merges the way CLIP does: the
    files are in CLIP's format, not only in one that transformers accepts."""
    module = open_clip_reference_tokenizer()
    merges = tmp_path / "merges.txt.gz"
    merges.write_bytes(gzip.compress(tokenizer_files(tokenizer)["merges.txt"].encode()))
    reference = module.SimpleTokenizer(str(merges))
    texts = held_out_texts["en"][:300] + held_out_texts["ru"][:300] + ["Кошка 🐱 中文 ñ — ok", "don't STOP"]
    for text in texts:
        assert reference.encode(text) == tokenizer(text, add_special_tokens=False).input_ids, text


def test_russian_words_are_not_split_into_bytes_by_accident():
    """NFC and lower-casing come before BPE: a decomposed й or an upper-case word meets the same
    tokens as the captions' spelling."""
    decomposed = unicodedata.normalize("NFD", "ЧАЙНИК и йогурт")
    assert decomposed != "ЧАЙНИК и йогурт"
    assert clip_words([decomposed]) == clip_words(["чайник и йогурт"])
