"""Where the `emojiworld` CLIP-filter thresholds come from (manip/ip2p/clip_filter.py), measured
with the evaluator CLIP: the scores of true edit pairs against pairs that are not edits.

True pairs: the rules backend's edits of validation-split captions, balanced over edit kinds,
both sides rendered exactly from the ground-truth scenes. Against them: the same images with
another pair's captions (CLIP-T of a caption that does not match), and each pair with another
pair's edited image in place of its own (an unrelated pair: directional and image similarity). A
threshold is placed between the two distributions; the JSON has the percentiles the profile's
docstring quotes, how many true and unrelated pairs each profile passes, and true pairs' image
similarity per edit kind (style edits change every pixel). Writes
benchmarks/results/clip_filter_calibration.json.

    python -m benchmarks.clip_filter_calibration [--n 400] [--clip models/clip] [--world data/world]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

OUT = Path("benchmarks/results/clip_filter_calibration.json")
PERCENTILES = (1, 5, 50, 95, 99)


def percentiles(values) -> dict[str, float]:
    return {f"p{q}": round(float(np.percentile(values, q)), 4) for q in PERCENTILES}


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation that moves every index, so no pair is matched with itself."""
    perm = rng.permutation(n)
    for i in np.flatnonzero(perm == np.arange(n)):
        j = (i + 1) % n
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="validation edits")
    ap.add_argument("--clip", default="models/clip")
    ap.add_argument("--world", default="data/world", help="EmojiWorld folder with a val split")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)

    from manip.ip2p import RulesEditor, world_captions
    from manip.ip2p.clip_filter import PROFILES, score_pairs
    from manip.ip2p.evaluate import build_cases
    from manip.metrics.clip_scores import ClipScorer
    from manip.runtime import set_threads
    from manip.training.checkpoint import atomic_write
    from manip.world import Artwork, Renderer
    from manip.world.dataset import load_split
    from stages.params import load_params

    params = load_params()
    val = Path(args.world) / "val"
    if not val.is_dir() or not (Path(args.clip) / "config.json").is_file():
        print(f"error: needs {val} and {args.clip} (`dvc repro world evaluator`)", file=sys.stderr)
        return 2
    set_threads()
    renderer = Renderer(Artwork(params.world.artwork_dir), params.world.size)
    captions = world_captions(load_split(val).scenes, params.seed, args.n, prefix="val")
    edits, _ = RulesEditor(params.seed).edit_all(captions, balanced=True)
    cases = build_cases(edits, renderer)
    scorer = ClipScorer(args.clip)
    sources, targets = np.stack([c.source for c in cases]), np.stack([c.truth for c in cases])
    inputs, outputs = [c.edit.input for c in cases], [c.edit.output for c in cases]
    other = derangement(len(cases), np.random.default_rng([params.seed, 31]))

    true = score_pairs(scorer, sources, targets, inputs, outputs)
    wrong_captions = score_pairs(scorer, sources, targets, [inputs[k] for k in other], [outputs[k] for k in other])
    unrelated = score_pairs(scorer, sources, targets[other], inputs, outputs)

    def col(rows, key):
        return np.array([r[key] for r in rows])

    clip_text_true = np.concatenate([col(true, "clip_text_input"), col(true, "clip_text_output")])
    clip_text_wrong = np.concatenate([col(wrong_captions, "clip_text_input"), col(wrong_captions, "clip_text_output")])
    kinds = sorted({c.edit.kind for c in cases})
    passes = {}
    for name, t in PROFILES.items():
        passes[name] = {
            "true_pairs": round(float(np.mean([not t.reasons(r) for r in true])), 4),
            "pairs_with_wrong_captions": round(float(np.mean([not t.reasons(r) for r in wrong_captions])), 4),
            "unrelated_pairs": round(float(np.mean([not t.reasons(r) for r in unrelated])), 4),
        }
    result = {
        "n_pairs": len(cases), "clip": args.clip, "split": "val", "seed": params.seed,
        "profiles": {name: asdict(t) for name, t in PROFILES.items()},
        "clip_text": {"matching_captions": percentiles(clip_text_true), "wrong_captions": percentiles(clip_text_wrong)},
        "clip_direction": {"true_edits": percentiles(col(true, "clip_direction")),
                           "unrelated_pairs": percentiles(col(unrelated, "clip_direction"))},
        "clip_image": {"true_edits": percentiles(col(true, "clip_image")),
                       "unrelated_pairs": percentiles(col(unrelated, "clip_image")),
                       "true_edits_by_kind": {k: percentiles([r["clip_image"] for r, c in zip(true, cases)
                                                              if c.edit.kind == k]) for k in kinds}},
        "passed": passes,
    }
    atomic_write(Path(args.out), json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
