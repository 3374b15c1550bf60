"""Paths and small helpers shared by the InstructPix2Pix dataset stages."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Sequence

from manip.ip2p.records import Rejected
from manip.training.checkpoint import atomic_write

ROOT = Path("data/ip2p")
CAPTIONS, CAPTIONS_REJECTED = ROOT / "captions.jsonl", ROOT / "captions_rejected.jsonl"
EDITS, QUARANTINE = ROOT / "edits.jsonl", ROOT / "edits_quarantine.jsonl"
PAIRS = ROOT / "pairs"
DATASET = ROOT / "dataset"
BASE, CLIP, WORLD_TRAIN = Path("models/base"), Path("models/clip"), Path("data/world/train")
# The InstructPix2Pix model and its English + Russian twin (stage ip2p_multilingual).
IP2P, IP2P_MULTILINGUAL = Path("models/ip2p"), Path("models/ip2p_multilingual")


def reason_counts(rejected: Sequence[Rejected]) -> dict[str, int]:
    return dict(sorted(Counter(r.reason for r in rejected).items()))


def write_metrics(path: Path, metrics: dict) -> dict:
    atomic_write(path, json.dumps(metrics, indent=1, sort_keys=True))
    print(json.dumps(metrics, indent=1, sort_keys=True))
    return metrics
