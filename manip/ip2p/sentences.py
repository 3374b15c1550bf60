"""Sentence sets for an edit direction (pix2pix-zero): many (source-side, target-side) caption
pairs that differ the way the edit does and vary in everything else, so that in the mean text
embedding of each side the shared context cancels and the edit's difference remains.

Two backends, like the caption edits, both writing in the edit's language, English or Russian
(Russian sentence sets steer pix2pix-zero on the multilingual model):
- `rules` (offline): the EmojiWorld scene grammar. Each pair is the edit's own source and target
  scene moved into a random context: every attribute the edit leaves alone (background, time
  of day, style, and the objects when the edit is not about them) is redrawn, the same for
  both sides, and both are captioned in the same random phrasing. Or, without new contexts,
  the scene's own phrasings on each side (`scene_sentences`).
- `openai`: an OpenAI-compatible chat endpoint is shown the edit (source caption, target
  caption, instruction) and asked for `n` such pairs as JSON. Transport failures are retried and
  answers cached exactly as for the caption edits; pairs that are not two different non-empty
  captions within the tokenizer's length are dropped with a count, and an answer with no usable
  pair is an error that names why.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from manip.multilingual.corpus import CAPTION_WRITERS, all_captions_in
from manip.multilingual.language import Language, LanguageError, detect_language, language_or_none
from manip.world.edits import Edit
from manip.world.sampling import sample_scene
from manip.world.scene import Scene

from .llm import LANGUAGE_NAMES, ChatEndpoint, LLMError, LLMSettings, json_object
from .records import CaptionError, check_caption

SentenceSets = tuple[tuple[str, ...], tuple[str, ...]]
_SCENE_FIELDS = ("background", "time", "style")


def recontext(edit: Edit, context: Scene) -> tuple[Scene, Scene]:
    """The edit's source and target with every attribute the edit does not change taken from
    `context`."""
    changes = {f: getattr(context, f) for f in _SCENE_FIELDS
               if getattr(edit.source, f) == getattr(edit.target, f)}
    if edit.source.objects == edit.target.objects:
        changes["objects"] = context.objects
    return edit.source.with_(**changes), edit.target.with_(**changes)


def rules_sentences(edit: Edit, n: int, seed: int, language: Language = "en") -> SentenceSets:
    """`n` caption pairs of the edit in random contexts, in `language`; the same (edit, n, seed)
    give the same scenes in either language."""
    if n < 1:
        raise ValueError(f"need at least one sentence pair, got n={n}")
    n_phrasings, write = CAPTION_WRITERS[language]
    rng = np.random.default_rng([seed, 11])
    src, tgt = [], []
    for _ in range(n):
        a, b = recontext(edit, sample_scene(rng, "train"))
        phrasing = int(rng.integers(n_phrasings))
        src.append(write(a, phrasing))
        tgt.append(write(b, phrasing))
    return tuple(src), tuple(tgt)


def scene_sentences(edit: Edit, language: Language = "en") -> SentenceSets:
    """Every phrasing, in `language`, of the edit's own source and target captions."""
    return tuple(all_captions_in(edit.source, language)), tuple(all_captions_in(edit.target, language))


SYSTEM = (
    "You help compute an edit direction for an image-editing model. You are shown the caption of an "
    "image, the caption after an edit, and the edit instruction. Reply with a JSON object with one field, "
    "\"pairs\": a list of N objects {\"source\": ..., \"target\": ...}, each two captions of another image "
    "before and after the same edit. Vary the scene, the setting and the phrasing from pair to pair; "
    "within a pair, change only what the edit changes. Reply with the JSON object only."
)


def sentence_messages(user: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def describe(source: str, target: str, instruction: str | None, n: int, language: Language = "en") -> str:
    lines = [f"N: {n}", f"caption: {source}", f"edited caption: {target}"]
    if instruction:
        lines.append(f"instruction: {instruction}")
    if language != "en":
        lines.append(f"language: {LANGUAGE_NAMES[language]} (write every caption in {LANGUAGE_NAMES[language]})")
    return "\n".join(lines)


@dataclass(frozen=True)
class ParsedPairs:
    pairs: tuple[tuple[str, str], ...]
    dropped: tuple[str, ...]  # why each unusable pair was left out


def parse_pairs(content: str | None, tokenizer=None, language: Language = "en") -> ParsedPairs:
    """The usable pairs of an answer, in `language`; raises ValueError when the answer is not
    the JSON asked for."""
    obj = json_object(content)
    rows = obj.get("pairs")
    if not isinstance(rows, list):
        raise ValueError(f"expected a list field \"pairs\", got keys {sorted(obj)}")
    pairs, dropped = [], []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("source", "target")):
            dropped.append(f"pair {i}: needs string fields source and target")
            continue
        try:
            a, b = check_caption(row["source"], tokenizer), check_caption(row["target"], tokenizer)
        except CaptionError as err:
            dropped.append(f"pair {i}: {err.reason} ({err.detail})")
            continue
        if a.strip().lower() == b.strip().lower():
            dropped.append(f"pair {i}: source and target are the same caption")
            continue
        if not language_or_none(a) == language_or_none(b) == language:
            dropped.append(f"pair {i}: not written in {LANGUAGE_NAMES[language]}")
            continue
        pairs.append((a, b))
    return ParsedPairs(tuple(pairs), tuple(dropped))


class OpenAISentences:
    """Sentence sets from an LLM, one (cached) request per edit."""

    def __init__(self, settings: LLMSettings, cache_dir: str | Path, tokenizer=None,
                 sleep: Callable[[float], None] | None = None):
        kwargs = {"sleep": sleep} if sleep is not None else {}
        self.endpoint = ChatEndpoint(settings, cache_dir, sentence_messages, **kwargs)
        self.tokenizer = tokenizer
        self.dropped: list[str] = []

    def __call__(self, source: str, target: str, instruction: str | None, n: int) -> SentenceSets:
        if n < 1:
            raise ValueError(f"need at least one sentence pair, got n={n}")
        try:
            language = detect_language(source)
        except LanguageError as err:
            raise LLMError(f"sentence pairs for {source!r}: {err}") from None
        content, failure = self.endpoint.answer(describe(source, target, instruction, n, language))
        if content is None:
            raise LLMError(f"sentence pairs for {source!r} -> {target!r}: {failure}")
        try:
            parsed = parse_pairs(content, self.tokenizer, language)
        except ValueError as err:
            raise LLMError(f"sentence pairs for {source!r} -> {target!r}: unusable answer: {err}") from None
        self.dropped.extend(parsed.dropped)
        if not parsed.pairs:
            raise LLMError(f"sentence pairs for {source!r} -> {target!r}: no usable pair in the answer "
                           f"({'; '.join(parsed.dropped) or 'empty list'})")
        pairs = parsed.pairs[:n]
        return tuple(a for a, _ in pairs), tuple(b for _, b in pairs)


def write_sentences(sets: SentenceSets, out_dir: str | Path) -> tuple[Path, Path]:
    """`source.txt` and `target.txt`, one sentence per line: what `manip edit --sentences` reads."""
    from manip.training.checkpoint import atomic_write

    out = Path(out_dir)
    paths = (out / "source.txt", out / "target.txt")
    for path, side in zip(paths, sets):
        atomic_write(path, "\n".join(side) + "\n")
    return paths

