"""Word <-> token bookkeeping and the token alignments Prompt-to-Prompt needs.

CLIP's BPE splits on whitespace before merging, so a prompt's tokens are the concatenation of
its words' tokens; every alignment here is built from those per-word spans.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence

import torch

from manip.multilingual.russian import fold_yo


def bare_word(word: str) -> str:
    """A word as edits name it: lower case, ё as е, without the punctuation at its edges."""
    return fold_yo(word.lower().strip(",.:;!?"))


class AlignmentError(ValueError):
    """Two prompts whose words cannot be aligned for the requested edit."""


@dataclass(frozen=True)
class WordSpans:
    words: list[str]
    spans: list[tuple[int, int]]  # token index range [start, end) of each word, BOS at index 0
    n_tokens: int  # including BOS and EOS

    def tokens_of(self, word: str) -> list[int]:
        """Token indices of every occurrence of `word` (case-insensitive, ё as е, punctuation
        at the word's edges ignored)."""
        wanted = bare_word(word)
        hits = [i for w, (a, b) in zip(self.words, self.spans) for i in range(a, b) if bare_word(w) == wanted]
        if not hits:
            raise AlignmentError(f"word {word!r} is not in the prompt {' '.join(self.words)!r}")
        return hits


def word_spans(tokenizer, prompt: str) -> WordSpans:
    words = prompt.split()
    spans, pos = [], 1
    for w in words:
        n = len(tokenizer(w, add_special_tokens=False).input_ids)
        spans.append((pos, pos + n))
        pos += n
    total = len(tokenizer(prompt).input_ids)
    if total != pos + 1:
        raise AlignmentError(f"could not split {prompt!r} into word tokens ({pos + 1} vs {total})")
    if total > tokenizer.model_max_length:
        raise AlignmentError(f"prompt has {total} tokens, over the limit of {tokenizer.model_max_length}: {prompt!r}")
    return WordSpans(words, spans, total)


def word_difference(source: Sequence[str], target: Sequence[str]) -> str:
    """The words that differ between two prompts, as "a b -> c" clauses, for error messages."""
    parts = []
    for op, a, b, c, d in difflib.SequenceMatcher(a=list(source), b=list(target), autojunk=False).get_opcodes():
        if op != "equal":
            parts.append(f"{' '.join(source[a:b]) or '(nothing)'} -> {' '.join(target[c:d]) or '(nothing)'}")
    return "; ".join(parts)


def replace_mapper(tokenizer, source: str, target: str) -> torch.Tensor:
    """(K, K) matrix M with target_attention[:, t] = sum_s source_attention[:, s] * M[s, t].

    Prompts must have the same number of words; a swapped word may have any number of tokens
    on either side: each of its target tokens takes the mean map of the source word's tokens.
    """
    k = tokenizer.model_max_length
    src, tgt = word_spans(tokenizer, source), word_spans(tokenizer, target)
    if len(src.words) != len(tgt.words):
        raise AlignmentError(
            f"replace needs prompts with the same number of words: {len(src.words)} in {source!r}, "
            f"{len(tgt.words)} in {target!r} ({word_difference(src.words, tgt.words)}); use refine for added words"
        )
    m = torch.zeros(k, k)
    m[0, 0] = 1.0
    for (sa, sb), (ta, tb) in zip(src.spans, tgt.spans):
        if sb - sa == tb - ta:
            for i in range(sb - sa):
                m[sa + i, ta + i] = 1.0
        else:
            m[sa:sb, ta:tb] = 1.0 / (sb - sa)
    # EOS and padding: align positionally after each prompt's last word. Where the source has
    # more tokens, the target's last padding columns reuse the source's last column instead of
    # being left with no attention at all.
    s_end, t_end = src.n_tokens - 1, tgt.n_tokens - 1
    for t in range(t_end, k):
        m[min(s_end + t - t_end, k - 1), t] = 1.0
    return m


def refine_mapper(tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, alpha) for refinement: target token t reuses source token index[t]'s map where
    alpha[t] = 1 (tokens shared by both prompts) and keeps its own map where alpha[t] = 0."""
    k = tokenizer.model_max_length
    s_ids = tokenizer(source).input_ids
    t_ids = tokenizer(target).input_ids
    for ids, p in ((s_ids, source), (t_ids, target)):
        if len(ids) > k:
            raise AlignmentError(f"prompt has {len(ids)} tokens, over the limit of {k}: {p!r}")
    index, alpha = torch.arange(k), torch.zeros(k)
    matcher = difflib.SequenceMatcher(a=s_ids[:-1], b=t_ids[:-1], autojunk=False)
    for block in matcher.get_matching_blocks():
        for j in range(block.size):
            index[block.b + j] = block.a + j
            alpha[block.b + j] = 1.0
    s_end, t_end = len(s_ids) - 1, len(t_ids) - 1
    for i in range(k - max(s_end, t_end)):
        index[t_end + i], alpha[t_end + i] = s_end + i, 1.0
    return index, alpha


def equalizer(tokenizer, prompt: str, weights: dict[str, float]) -> torch.Tensor:
    """(K,) per-token attention scale: the named words get their weight, every other token 1."""
    spans = word_spans(tokenizer, prompt)
    eq = torch.ones(tokenizer.model_max_length)
    for word, w in weights.items():
        eq[spans.tokens_of(word)] = float(w)
    return eq
