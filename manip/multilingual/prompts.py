"""The prompt boundary of the multilingual model: every prompt's language is told before any
model runs, so a mixed-script or unsupported prompt fails at once with the reason, instead of
being tokenized into bytes the student never learnt and drawn as noise."""
from __future__ import annotations

from collections.abc import Sequence

from .language import LanguageError, detect_language
from .russian import fold_yo

# A tokenizer that learnt Russian reads a caption word as one or two pieces; one that did not
# (CLIP's English BPE) falls back to bytes, five or more pieces a word.
MAX_PIECES_PER_WORD = 3


def prepare_prompts(prompts: Sequence[str]) -> list[str]:
    """The prompts in the spelling the captions use (ё as е), or a LanguageError naming the
    first prompt that is neither English nor Russian and why."""
    for number, prompt in enumerate(prompts, 1):
        try:
            detect_language(prompt)
        except LanguageError as err:
            raise LanguageError(f"prompt {number} ({prompt!r}): {err}") from None
    return [fold_yo(prompt) for prompt in prompts]


def check_tokenizer_reads(tokenizer, prompts: Sequence[str], model: str) -> None:
    """Refuse a Russian prompt for a model whose tokenizer never learnt Russian: it would reach
    the text encoder as byte pieces, and the image would be noise, not an error."""
    for number, prompt in enumerate(prompts, 1):
        if detect_language(prompt) != "ru":
            continue
        words = len(prompt.split())
        pieces = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        if pieces > MAX_PIECES_PER_WORD * words:
            raise LanguageError(
                f"prompt {number} ({prompt!r}) is Russian, but the model at {model} does not read Russian: "
                f"its tokenizer splits the prompt's {words} words into {pieces} byte pieces; use a "
                "multilingual model such as models/multilingual")
