"""Stage `ip2p_captions`: the captions to edit, from EmojiWorld (default), a JSONL file or a
Hugging Face dataset column, screened against the base model's tokenizer.

Outputs data/ip2p/captions.jsonl, data/ip2p/captions_rejected.jsonl (each rejected caption with
its reason) and metrics/ip2p_captions.json.
"""
from __future__ import annotations

from pathlib import Path

from manip.ip2p import dataset_captions, jsonl_captions, screen, world_captions, write_jsonl

from manip.ip2p.captions import CaptionSourceError

from ._runner import StageInputError, main
from .common import require
from .ip2p_common import BASE, CAPTIONS, CAPTIONS_REJECTED, WORLD_TRAIN, reason_counts, write_metrics
from .params import Params, load_params

METRICS = Path("metrics/ip2p_captions.json")


def run(params: Params) -> dict:
    from transformers import CLIPTokenizer

    from manip.world.dataset import load_split

    c = params.ip2p.captions
    tokenizer = CLIPTokenizer.from_pretrained(require(BASE / "tokenizer", "text_encoder"))
    unreadable = []
    if c.source == "emojiworld":
        raw = world_captions(load_split(require(WORLD_TRAIN, "world")).scenes, params.seed, c.n)
    elif c.source == "jsonl":
        raw, unreadable = jsonl_captions(c.path, c.column, c.id_field)
    else:
        try:
            raw = dataset_captions(c.path, c.column, c.split)
        except CaptionSourceError as err:
            raise StageInputError(f"ip2p.captions: {err}") from None
    kept, rejected = screen(raw, tokenizer)
    rejected = unreadable + rejected
    write_jsonl(CAPTIONS, kept)
    write_jsonl(CAPTIONS_REJECTED, rejected)
    return write_metrics(METRICS, {"source": c.source, "captions": len(kept), "rejected": len(rejected),
                                   "rejected_by_reason": reason_counts(rejected)})


if __name__ == "__main__":
    main(lambda: run(load_params()))
