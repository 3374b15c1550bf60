"""The prompt boundary of the multilingual model: every prompt's language is told before any
model runs, so a mixed-script or unsupported prompt fails at once with the reason, instead of
being tokenized into bytes the student never learnt and drawn as noise."""
from __future__ import annotations

from collections.abc import Sequence

from .language import LanguageError, detect_language
from .russian import fold_yo


def prepare_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts in the spelling the captions use (ё as е), or a LanguageError naming the
    first prompt that is neither English nor Russian and why."""
    for number, prompt in enumerate(prompts, 1):
        try:
            detect_language(prompt)
        except LanguageError as err:
            raise LanguageError(f"prompt {number} ({prompt!r}): {err}") from None
    return [fold_yo(prompt) for prompt in prompts]
