"""Stage `ip2p_edits`: one {input, edit, output} caption edit per caption, from the `rules` backend
(offline, EmojiWorld grammar, with ground truth) or the `openai` backend (any OpenAI-compatible
endpoint; answers cached under `cache_dir`, so a rerun sends no requests).

Outputs data/ip2p/edits.jsonl, data/ip2p/edits_quarantine.jsonl (every caption without a usable
edit, with the reason) and metrics/ip2p_edits.json.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from manip.ip2p import Caption, RulesEditor, read_jsonl, write_jsonl

from ._runner import StageInputError, main
from .common import require
from .ip2p_common import BASE, CAPTIONS, EDITS, QUARANTINE, reason_counts, write_metrics
from .params import OpenAIParams, Params, load_params

if TYPE_CHECKING:
    from manip.ip2p.llm import LLMSettings

METRICS = Path("metrics/ip2p_edits.json")


def llm_settings(o: OpenAIParams) -> LLMSettings:
    from manip.ip2p.llm import LLMSettings, load_examples

    return LLMSettings(
        model=o.model, base_url=o.base_url, n_examples=o.n_examples, temperature=o.temperature,
        max_tokens=o.max_tokens, json_mode=o.json_mode, timeout=o.timeout, max_attempts=o.max_attempts,
        backoff=o.backoff, max_backoff=o.max_backoff, concurrency=o.concurrency,
        examples=tuple(load_examples(o.examples_file)) if o.examples_file else ())


def base_tokenizer():
    """The base model's tokenizer: LLM answers must fit its context."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(require(BASE / "tokenizer", "text_encoder"))


def editor(params: Params):
    e = params.ip2p.edits
    if e.backend == "rules":
        return RulesEditor(params.seed, e.kinds)
    from manip.ip2p.llm import OpenAIEditor

    return OpenAIEditor(llm_settings(e.openai), e.openai.cache_dir, base_tokenizer())


def run(params: Params, progress: bool = True) -> dict:
    from manip.ip2p.llm import LLMError

    captions = read_jsonl(require(CAPTIONS, "ip2p_captions"), Caption)
    try:  # no key, or an endpoint that refuses every request: the message says which
        backend = editor(params)
        edits, quarantined = backend.edit_all(captions, progress=progress)
    except LLMError as err:
        raise StageInputError(str(err)) from None
    write_jsonl(EDITS, edits)
    write_jsonl(QUARANTINE, quarantined)
    metrics = {"backend": backend.name, "captions": len(captions), "edits": len(edits),
               "quarantined": len(quarantined), "quarantined_by_reason": reason_counts(quarantined),
               "edits_by_kind": dict(sorted(Counter(e.kind or "unlabelled" for e in edits).items()))}
    write_metrics(METRICS, metrics)
    if hasattr(backend, "requests"):
        print(f"{backend.requests} requests sent; every other answer came from the cache")
    return metrics


if __name__ == "__main__":
    main(lambda: run(load_params()))
