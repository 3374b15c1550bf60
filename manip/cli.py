"""Command line: `manip invert` writes an inversion artifact, `manip edit` edits a real image,
`manip sentences` asks an LLM for pix2pix-zero's sentence sets, `manip generate` draws from
English or Russian prompts.

    manip edit --model models/base --image in.png --source "a cat on the beach" \
        --target "a dog on the beach" --edit replace --inversion null-text --out out.png
    manip edit --method imagic --settings '{"eta": 0.8}' --etas 0.6,1.0 --cache .cache/parts \
        --image in.png --source "a cat on the beach" --target "a dog on the beach" --out out.png
    manip sentences --source "a cat on the beach" --target "a dog on the beach" --n 32 --out-dir dirs/cat-dog
    manip edit --method pix2pix-zero --sentences dirs/cat-dog/source.txt dirs/cat-dog/target.txt ...
    manip generate --prompt "красная кошка слева на пляже ночью" --out cat.png
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

from manip.editing import INVERSION_DEFAULTS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Kept here, not imported from manip.editing.single: `--help` must not load torch.
SINGLE_METHODS = ("p2p", "imagic", "unitune", "sine", "pix2pix-zero", "instruct-pix2pix")


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
        p.add_argument("--inversion", choices=["ddim", "null-text", "negative-prompt", "direct"],
                       help=f"default {INVERSION_DEFAULTS['inversion']}; with --from-inversion, the artifact's")
        p.add_argument("--steps", type=int, help=f"default {INVERSION_DEFAULTS['steps']}; with --from-inversion, "
                                                 "the artifact's")
        p.add_argument("--guidance", type=float, help=f"default {INVERSION_DEFAULTS['guidance']}; with "
                                                      "--from-inversion, the artifact's")
        p.add_argument("--inner-steps", type=int, default=10, help="null-text Adam steps per timestep")
        p.add_argument("--null-text-lr", type=float, default=1e-2,
                       help="null-text's initial Adam rate (default the reference's 1e-2; 3e-2 is about twice as fast)")
        p.add_argument("--size", help="P2P's working size: auto (the default: the image's aspect ratio at about the "
                                      "model's pixel count), square (the model's native square, centre-cropped) or "
                                      "WIDTHxHEIGHT; with --from-inversion, the artifact's")

    inv = sub.add_parser("invert", help="invert an image and save the reusable artifact")
    common(inv)
    inv.add_argument("--out", required=True, help="artifact folder")

    ed = sub.add_parser("edit", help="edit an image with Prompt-to-Prompt")
    common(ed)
    ed.add_argument("--target", required=True, action="append", help="target caption (repeat for several)")
    ed.add_argument("--edit", default="replace", choices=["replace", "refine", "reweight", "none"])
    ed.add_argument("--reweight", action="append", metavar="WORD=SCALE",
                    help="scale a target word's attention: on its own with --edit reweight, or on top of a replace "
                         "or refine edit")
    ed.add_argument("--blend-source", action="append", metavar="WORDS", help="local blend: source words")
    ed.add_argument("--blend-target", action="append", metavar="WORDS", help="local blend: target words")
    ed.add_argument("--blend-threshold", type=float, default=0.3)
    ed.add_argument("--blend-start", type=float, default=0.2, help="fraction of the steps before blending starts")
    ed.add_argument("--cross-replace", type=float, default=0.8)
    ed.add_argument("--self-replace", type=float, default=0.4)
    ed.add_argument("--self-max-pixels", type=int, metavar="N",
                    help="inject self-attention only in layers of at most N query pixels (default: all layers)")
    ed.add_argument("--heatmaps", metavar="PNG", help="also write cross-attention heatmaps of every prompt")
    ed.add_argument("--heatmap-unit", choices=["word", "token"], default="word",
                    help="one heatmap per word (its tokens summed) or per token")
    ed.add_argument("--from-inversion", help="reuse an artifact written by `manip invert`")
    ed.add_argument("--out", required=True, help="output PNG (several targets: OUT stem + _<i>.png)")
    ed.add_argument("--method", default="p2p", choices=SINGLE_METHODS,
                    help="p2p (the options above), or a single-image method (see manip/editing/single)")
    ed.add_argument("--settings", default="{}", metavar="JSON",
                    help="the method's config fields, e.g. '{\"tune\": {\"steps\": 300, \"lr\": 5e-5}}'")
    ed.add_argument("--cache", metavar="DIR", help="keep the method's reusable parts here for later edits")
    ed.add_argument("--instruction", help="instruct-pix2pix: the edit as an instruction")
    ed.add_argument("--etas", help="imagic: also write an eta sweep, e.g. 0.5,0.7,0.9 (OUT stem + _eta<v>.png)")
    ed.add_argument("--sentences", nargs=2, metavar=("SOURCE_TXT", "TARGET_TXT"),
                    help="pix2pix-zero: files of source-side and target-side sentences, one per line")
    ed.add_argument("--seed", type=int, default=0,
                    help="noise of the single-image methods; P2P edits start from the inversion's noise and draw none")

    se = sub.add_parser("sentences", help="pix2pix-zero sentence sets from an OpenAI-compatible endpoint "
                                          "(key from OPENAI_API_KEY only)")
    se.add_argument("--source", required=True, help="caption of the input image")
    se.add_argument("--target", required=True, help="caption after the edit")
    se.add_argument("--instruction", help="the edit in words, shown to the LLM")
    se.add_argument("--n", type=int, default=16, help="sentence pairs to ask for")
    se.add_argument("--llm-model", default="gpt-4o-mini")
    se.add_argument("--base-url", help="else OPENAI_BASE_URL, else the client's default")
    se.add_argument("--tokenizer", default="models/base/tokenizer", help="sentences must fit this tokenizer")
    se.add_argument("--cache", default=".cache/llm-sentences", help="answers cached here: a rerun sends nothing")
    se.add_argument("--out-dir", required=True, help="writes source.txt and target.txt")

    ge = sub.add_parser("generate", help="text-to-image from English or Russian prompts")
    ge.add_argument("--model", default="models/multilingual", help="a diffusers Stable Diffusion pipeline folder")
    ge.add_argument("--prompt", required=True, action="append", help="English or Russian (repeat for several)")
    ge.add_argument("--steps", type=int, default=50)
    ge.add_argument("--guidance", type=float, default=7.5)
    ge.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    ge.add_argument("--out", required=True, help="output PNG (several prompts: OUT stem + _<i>.png)")
    return ap


def run_sentences(args: argparse.Namespace) -> dict:
    from transformers import CLIPTokenizer

    from manip.ip2p.llm import LLMSettings
    from manip.ip2p.sentences import OpenAISentences, write_sentences

    tok_dir = Path(args.tokenizer)
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"--tokenizer: no tokenizer folder at {tok_dir}")
    settings = LLMSettings(model=args.llm_model, base_url=args.base_url, max_tokens=2000)
    llm = OpenAISentences(settings, args.cache, CLIPTokenizer.from_pretrained(tok_dir))
    sets = llm(args.source, args.target, args.instruction, args.n)
    paths = write_sentences(sets, args.out_dir)
    return {"source": str(paths[0]), "target": str(paths[1]), "pairs": len(sets[0]),
            "dropped": llm.dropped, "requests": llm.endpoint.requests}


def save_png(image, path: Path) -> None:
    """Atomically: a reader never sees half an image under the final name."""
    from manip.training.checkpoint import atomic_write

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())


def _sentences(paths: list[str] | None) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    if not paths:
        return None
    sides = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--sentences: no file at {path}")
        sides.append(tuple(line.strip() for line in Path(path).read_text().splitlines() if line.strip()))
    return sides[0], sides[1]


def run_single(args: argparse.Namespace) -> dict:
    """`manip edit --method <single-image method>`: each target edited with the parts cached."""
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline
    from PIL import Image

    from manip.editing.single import EDITORS, PartCache, make_config, prepare_request
    from manip.runtime import device, set_threads

    set_threads()
    try:
        settings = json.loads(args.settings)
    except json.JSONDecodeError as err:
        raise ValueError(f"--settings is not valid JSON: {err}") from None
    if not isinstance(settings, dict):
        raise ValueError("--settings must be a JSON object")
    config = make_config(args.method, settings)
    etas = [float(v) for v in args.etas.split(",")] if args.etas else []
    if args.size:
        raise ValueError(f"--size is for --method p2p: {args.method} edits at the model's native square")
    if etas and args.method != "imagic":
        raise ValueError("--etas is for --method imagic")
    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
    loader = StableDiffusionInstructPix2PixPipeline if args.method == "instruct-pix2pix" else StableDiffusionPipeline
    pipe = loader.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device())
    cache = PartCache(args.cache)
    editor = EDITORS[args.method](pipe, config, cache)
    out_path = Path(args.out)
    result: dict = {"method": args.method, "outputs": [], "seconds": [], "cached": [], "notes": []}
    try:
        for i, target in enumerate(args.target):
            request, notes = prepare_request(pipe, args.image, args.source, target, instruction=args.instruction,
                                             sentences=_sentences(args.sentences), seed=args.seed)
            out = editor.edit_sweep(request, etas) if etas else editor.edit(request)
            path = (out_path if len(args.target) == 1 else
                    out_path.with_name(f"{out_path.stem}_{i + 1}{out_path.suffix}"))
            save_png(Image.fromarray(out.image), path)
            result["outputs"].append(str(path))
            result["seconds"].append(out.seconds)
            result["cached"].append(out.cached)
            result.update(notes=notes, stored_bytes=out.stored_bytes)
            if etas:
                result["sweep"] = []
                for eta, img in zip(etas, out.extras["sweep"]):
                    eta_path = path.with_name(f"{path.stem}_eta{eta}{path.suffix}")
                    save_png(Image.fromarray(img), eta_path)
                    result["sweep"].append(str(eta_path))
    finally:
        cache.close()
    return result


def run_generate(args: argparse.Namespace) -> dict:
    """Every prompt's language, and whether the model's tokenizer reads it, is checked before
    the model loads."""
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from transformers import AutoTokenizer

    from manip.customize.base import concept_words
    from manip.prompts import read_prompts
    from manip.runtime import device, set_threads
    from manip.sampling import generate

    if any(not p.strip() for p in args.prompt):
        raise ValueError("prompts must not be empty")
    set_threads()
    model = Path(args.model)
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
    words = concept_words(model)  # a DreamBooth folder's identifier may stand in a Russian prompt
    prompts = read_prompts(AutoTokenizer.from_pretrained(model / "tokenizer"), args.prompt, words)
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.to(device())
    images = generate(pipe, prompts, [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))],
                      steps=args.steps, guidance_scale=args.guidance, placeholders=words)
    out = Path(args.out)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}")
                                            for i in range(1, len(images) + 1)]
    for path, image in zip(paths, images):
        save_png(Image.fromarray(image), path)
    return {"outputs": [str(p) for p in paths]}


def run(args: argparse.Namespace) -> dict:
    if args.command == "sentences":
        return run_sentences(args)
    if args.command == "generate":
        return run_generate(args)
    if getattr(args, "method", "p2p") != "p2p":
        return run_single(args)
    from PIL import Image

    from manip.editing.api import edit_image, invert_image
    from manip.runtime import set_threads

    set_threads()
    shared = dict(inversion=args.inversion, steps=args.steps, guidance=args.guidance, inner_steps=args.inner_steps,
                  null_text_lr=args.null_text_lr, size=args.size, progress=True)
    if args.command == "invert":
        inversion = invert_image(args.model, args.image, args.source, out=args.out, **shared)
        return {"artifact": args.out, "seconds": inversion.seconds, "notes": inversion.notes}
    blend = {"blend_source": _words(args.blend_source), "blend_target": _words(args.blend_target)}
    result = edit_image(args.model, args.image, args.source, args.target, edit=args.edit,
                        reweight=_weights(args.reweight), blend_threshold=args.blend_threshold,
                        blend_start=args.blend_start, cross_replace=args.cross_replace,
                        self_replace=args.self_replace, self_max_pixels=args.self_max_pixels,
                        from_inversion=args.from_inversion, heatmaps=bool(args.heatmaps),
                        heatmap_unit=args.heatmap_unit, **blend, **shared)
    out = Path(args.out)
    paths = ([out] if len(result.edits) == 1 else
             [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(1, len(result.edits) + 1)])
    for path, img in zip(paths, result.edits):
        save_png(Image.fromarray(img), path)
    summary = {"outputs": [str(p) for p in paths], "inversion_seconds": result.inversion.seconds,
               "notes": result.notes}
    if result.heatmaps is not None:
        save_png(result.heatmaps, Path(args.heatmaps))
        summary["heatmaps"] = args.heatmaps
    return summary


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from manip.editing.images import ImageInputError
    from manip.editing.inversion import InversionMismatch
    from manip.editing.tokens import AlignmentError
    from manip.ip2p.llm import LLMError
    from manip.prompts import PromptError

    try:
        print(json.dumps(run(args), indent=1))
    except (ImageInputError, InversionMismatch, AlignmentError, PromptError, LLMError, ValueError, OSError) as err:
        # OSError: a missing or unreadable model or input file, an output path that cannot be written
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # torch's own: out of memory, a model whose parts do not fit together
        print(f"error: the model failed on this input ({type(err).__name__}): {str(err).splitlines()[0]}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
