"""Which language a prompt is in, told by its script: English is written in Latin letters,
Russian in Cyrillic, and the two alphabets do not overlap, so no statistical model is needed.

Rules:
- Only letters count. Digits, punctuation, emoji and modifier letters belong to no language.
- A token in angle brackets (`<teapot>`, `<sks>`) is a placeholder for a learnt concept, the way
  textual inversion writes one; it belongs to no language and may appear in a prompt of either.
  So does any word the caller names as a placeholder: the rare-token identifier a DreamBooth or
  UniTune model was tuned on (`sks чайник` is a Russian prompt for that model). Elsewhere a bare
  `sks` is a Latin word, and it makes a Russian prompt mixed.
- A prompt with no letters outside placeholders (`<teapot>`, `42`) is English, the base
  model's language: there is nothing to translate.
- Empty prompts, prompts mixing Latin and Cyrillic, and letters of any other script are errors
  that name the offending words, so a caller can show them to the user.
"""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection
from typing import Literal

Language = Literal["en", "ru"]

SCRIPT_LANGUAGES: dict[str, Language] = {"LATIN": "en", "CYRILLIC": "ru"}
DEFAULT_LANGUAGE: Language = "en"
PLACEHOLDER = re.compile(r"<[^<>\s]+>")
PLACEHOLDER_WORD = "<concept>"  # stands in for a learnt concept's phrase when a template's language is told
_EDGE_PUNCTUATION = re.compile(r"^\W+|\W+$")


class LanguageError(ValueError):
    """A prompt whose language cannot be told or is not supported."""


def letter_script(char: str) -> str:
    """The script a letter belongs to, as the first word of its Unicode name (LATIN, CYRILLIC,
    GREEK, ARABIC, CJK, HANGUL, ...)."""
    name = unicodedata.name(char, "")
    return name.split(" ", 1)[0] if name else "UNKNOWN"


def _is_script_letter(char: str) -> bool:
    """Letters proper: modifier letters (Lm) such as ʼ or ー are marks of several scripts."""
    category = unicodedata.category(char)
    return category.startswith("L") and category != "Lm"


def _words_by_script(prompt: str, placeholders: Collection[str]) -> dict[str, list[str]]:
    """Whitespace-separated words keyed by the script of their letters. NFKC folds full-width
    and other compatibility forms (ａ -> a) so they count as the script they look like."""
    by_script: dict[str, list[str]] = {}
    ignored = {p.lower() for p in placeholders}
    for chunk in PLACEHOLDER.sub(" ", unicodedata.normalize("NFKC", prompt)).split():
        scripts = sorted({letter_script(c) for c in chunk if _is_script_letter(c)})
        word = _EDGE_PUNCTUATION.sub("", chunk) or chunk
        if word.lower() in ignored:
            continue
        if len(scripts) > 1:
            raise LanguageError(
                f"the word {word!r} mixes {' and '.join(scripts)} letters (a look-alike letter "
                "typed in the other keyboard layout?); write each word in one alphabet"
            )
        if scripts:
            by_script.setdefault(scripts[0], []).append(word)
    return by_script


def detect_language(prompt: str, placeholders: Collection[str] = ()) -> Language:
    """`placeholders`: words that name a learnt concept in any language (see the rules above)."""
    if not prompt.strip():
        raise LanguageError("the prompt is empty")
    by_script = _words_by_script(prompt, placeholders)
    unsupported = {s: w for s, w in by_script.items() if s not in SCRIPT_LANGUAGES}
    if unsupported:
        found = "; ".join(f"{script}: {words}" for script, words in sorted(unsupported.items()))
        raise LanguageError(
            f"unsupported script in the prompt ({found}); prompts must be English (Latin letters) "
            "or Russian (Cyrillic letters)"
        )
    if len(by_script) > 1:
        raise LanguageError(
            f"the prompt mixes English words {by_script['LATIN']} and Russian words "
            f"{by_script['CYRILLIC']}; write it in one language, and write a learnt concept's "
            "placeholder in angle brackets (<sks>) to use it in either"
        )
    return SCRIPT_LANGUAGES[next(iter(by_script))] if by_script else DEFAULT_LANGUAGE


def language_or_none(text: str, placeholders: Collection[str] = ()) -> Language | None:
    """The text's language, or None where `detect_language` would refuse it."""
    try:
        return detect_language(text, placeholders)
    except LanguageError:
        return None
