"""Command line: `manip invert` writes an inversion artifact, `manip edit` edits a real image.

    manip edit --model models/base --image in.png --source "a cat on the beach" \
        --target "a dog on the beach" --edit replace --inversion null-text --out out.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _words(values: list[str] | None) -> list[str]:
    return [w for v in values or [] for w in v.split(",") if w]


def _weights(values: list[str] | None) -> dict[str, float]:
    out = {}
    for v in values or []:
        word, sep, weight = v.partition("=")
        if not sep:
            raise ValueError(f"--reweight takes WORD=SCALE, got {v!r}")
        try:
            out[word] = float(weight)
        except ValueError:
            raise ValueError(f"--reweight scale for {word!r} is not a number: {weight!r}") from None
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="manip", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="models/base", help="a diffusers Stable Diffusion pipeline folder")
        p.add_argument("--image", required=True)
        p.add_argument("--source", required=True, help="caption of the input image")
        p.add_argument("--inversion", default="null-text", choices=["ddim", "null-text", "negative-prompt", "direct"])
        p.add_argument("--steps", type=int, default=50)
        p.add_argument("--guidance", type=float, default=7.5)
        p.add_argument("--inner-steps", type=int, default=10, help="null-text Adam steps per timestep")

    inv = sub.add_parser("invert", help="invert an image and save the reusable artifact")
    common(inv)
    inv.add_argument("--out", required=True, help="artifact folder")

    ed = sub.add_parser("edit", help="edit an image with Prompt-to-Prompt")
    common(ed)
    ed.add_argument("--target", required=True, action="append", help="target caption (repeat for several)")
    ed.add_argument("--edit", default="replace", choices=["replace", "refine", "reweight", "none"])
    ed.add_argument("--reweight", action="append", metavar="WORD=SCALE")
    ed.add_argument("--blend-source", action="append", metavar="WORDS", help="local blend: source words")
    ed.add_argument("--blend-target", action="append", metavar="WORDS", help="local blend: target words")
    ed.add_argument("--blend-threshold", type=float, default=0.3)
    ed.add_argument("--blend-start", type=float, default=0.2, help="fraction of the steps before blending starts")
    ed.add_argument("--cross-replace", type=float, default=0.8)
    ed.add_argument("--self-replace", type=float, default=0.4)
    ed.add_argument("--heatmaps", metavar="PNG", help="also write per-word cross-attention heatmaps of every prompt")
    ed.add_argument("--from-inversion", help="reuse an artifact written by `manip invert`")
    ed.add_argument("--out", required=True, help="output PNG (several targets: OUT stem + _<i>.png)")
    return ap


def save_png(image, path: Path) -> None:
    """Atomically: a reader never sees half an image under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    tmp.replace(path)


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from manip.editing.attention import AttentionStore
    from manip.editing.edit import edit_inverted
    from manip.editing.heatmaps import render_heatmaps
    from manip.editing.images import load_image
    from manip.editing.inversion import Inversion, invert
    from manip.editing.p2p import P2PConfig, PromptToPrompt
    from manip.runtime import device, set_threads
    from manip.sampling import check_prompts

    set_threads()

    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device())
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    image, notes = load_image(args.image, size)
    prompts = [args.source, *getattr(args, "target", [])]
    if any(not p.strip() for p in prompts):
        raise ValueError("prompts must not be empty")
    check_prompts(pipe.tokenizer, prompts)
    config = None
    if args.command == "edit":
        blend = None
        if args.blend_source or args.blend_target:
            blend = (_words(args.blend_source), _words(args.blend_target))
        config = P2PConfig(edit=args.edit, cross_replace=args.cross_replace, self_replace=args.self_replace,
                           reweight=_weights(args.reweight), blend_words=blend, blend_threshold=args.blend_threshold,
                           blend_start=args.blend_start)
        # Words that do not align fail here, before minutes of inversion, not after.
        PromptToPrompt(pipe.tokenizer, prompts, args.steps, config, guided=args.guidance != 1.0)
    if args.command == "edit" and args.from_inversion:
        inversion = Inversion.load(args.from_inversion, pipe)
    else:
        inversion = invert(pipe, image, args.source, args.inversion, args.steps, args.guidance, args.inner_steps,
                           progress=True)
    if args.command == "invert":
        inversion.notes = notes
        inversion.save(args.out)
        return {"artifact": args.out, "seconds": inversion.seconds, "notes": notes}
    store = AttentionStore(guided=inversion.guidance_scale != 1.0) if args.heatmaps else None
    images = edit_inverted(pipe, inversion, args.target, config, record=store)
    out = Path(args.out)
    paths = [out] if len(images) == 2 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(1, len(images))]
    for path, img in zip(paths, images[1:]):
        save_png(Image.fromarray(np.asarray(img)), path)
    result = {"outputs": [str(p) for p in paths], "inversion_seconds": inversion.seconds, "notes": notes}
    if store is not None:
        save_png(render_heatmaps(store, pipe.tokenizer, [inversion.prompt, *args.target], images), Path(args.heatmaps))
        result["heatmaps"] = args.heatmaps
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from manip.editing.images import ImageInputError
    from manip.editing.inversion import InversionMismatch
    from manip.editing.tokens import AlignmentError
    from manip.sampling import PromptError

    try:
        print(json.dumps(run(args), indent=1))
    except (ImageInputError, InversionMismatch, AlignmentError, PromptError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
