"""The prompt boundary every model path goes through: generation, inversion, Prompt-to-Prompt,
the single-image editors and the customizers all read their prompts with `read_prompts` before
any model runs.

A prompt the text encoder cannot read as meant fails here, with the reason and the prompt's
number, instead of being tokenized into pieces the encoder never learnt and drawn as noise: an
empty prompt, mixed or unsupported scripts, Russian for a tokenizer that never learnt Russian,
or more tokens than the encoder's context. The empty prompt is the unconditional one that
classifier-free guidance runs and passes; where a caller needs a real prompt it refuses empty
ones itself. Prompts come back in the spelling the captions use
(ё as е), so a prompt typed with ё meets the tokens the model was trained on.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence

from manip.multilingual.language import LanguageError, detect_language
from manip.multilingual.russian import fold_yo

# Whether a tokenizer learnt Russian is told on a reference caption, not on the prompt: a word the
# tokenizer never saw whole splits into several pieces on any tokenizer. One that learnt Russian
# reads each word of the reference as one or two pieces; one that did not (CLIP's English BPE)
# falls back to bytes, five or more pieces a word.
RUSSIAN_REFERENCE = "красная кошка слева на пляже ночью"
MAX_PIECES_PER_WORD = 3


class PromptError(ValueError):
    """A prompt the text encoder cannot take as given."""


def learnt_tokens(tokenizer) -> set[str]:
    """Tokens added to the vocabulary after training (textual-inversion placeholders and their
    multi-vector parts): concept names that belong to no language."""
    return set(tokenizer.get_added_vocab()) - set(tokenizer.all_special_tokens)


def _check_reads_russian(tokenizer) -> None:
    words = len(RUSSIAN_REFERENCE.split())
    pieces = len(tokenizer(RUSSIAN_REFERENCE, add_special_tokens=False).input_ids)
    if pieces > MAX_PIECES_PER_WORD * words:
        where = f" (tokenizer {tokenizer.name_or_path})" if tokenizer.name_or_path else ""
        raise LanguageError(
            f"it is Russian, but this model{where} does not read Russian: its tokenizer splits a {words}-word "
            f"Russian caption into {pieces} byte pieces; use a multilingual model such as models/multilingual")


def read_prompts(tokenizer, prompts: Sequence[str], placeholders: Collection[str] = ()) -> list[str]:
    """The prompts as the text encoder should read them, or a PromptError / LanguageError naming
    the first one that cannot be read and why. `placeholders` are words that name a learnt
    concept in any language (a DreamBooth identifier such as `sks`); the tokenizer's added
    tokens and words in angle brackets always are."""
    known = {*placeholders, *learnt_tokens(tokenizer)}
    limit = tokenizer.model_max_length
    out = []
    for number, prompt in enumerate(prompts, 1):
        if not isinstance(prompt, str):
            raise PromptError(f"prompt {number}: prompts must be strings, got {type(prompt).__name__}")
        text = fold_yo(prompt)
        try:
            if text.strip() and detect_language(text, known) == "ru":
                _check_reads_russian(tokenizer)
        except LanguageError as err:
            raise LanguageError(f"prompt {number} ({prompt[:80]!r}): {err}") from None
        n = len(tokenizer(text).input_ids)
        if n > limit:
            raise PromptError(f"prompt {number} has {n} tokens, over the tokenizer limit of {limit}: {prompt[:80]!r}")
        out.append(text)
    return out
