"""Stage `customize`: every (method x concept) customization run on the embedded base model,
the multi-concept runs, and their evaluation; aggregates metrics/customize.json and one image
grid per method under plots/customize/.

A run trains (resuming from checkpoints/customize/<run>/<fingerprint>), saves its artifact to
models/concepts/<method>/<concept>/ in the format diffusers loads, samples the evaluation prompts
and writes result.json beside the artifact. A run whose result.json carries the current
fingerprint (settings, base model, evaluation, the code the run executes under
manip/customize and manip/training) is done and skipped, so the stage resumes and the Prefect
flow can fan runs out before `dvc repro customize` records them. Every run trains in a process
of its own, here as in the flow, so its time and peak memory are its own:

    python -m stages.customize                 # every run not yet done, then the aggregate
    python -m stages.customize --run lora/teapot
    python -m stages.customize --list          # the run names, in waves, as JSON

A failing run does not stop the others; the stage reports every failure and exits non-zero
without writing the aggregate, so DVC never records a partial result.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ._runner import StageInputError, main
from .common import ROOT, code_digest, files_digest, require
from .params import CustomizeParams, Params, load_params

if TYPE_CHECKING:
    import numpy as np

BASE, CLIP, JUDGE = Path("models/base"), Path("models/clip"), Path("models/judge")
ELITE_ENCODER = Path("models/elite_encoder")
CONCEPTS = Path("models/concepts")
CKPT = Path("checkpoints/customize")
PRIOR_CACHE = Path("checkpoints/customize/prior")
# How the class-image cache stores images. It is part of the cache key and of DreamBooth runs'
# fingerprints, so that images cached in an older layout are neither read nor counted as trained on.
CLASS_IMAGE_FORMAT = "uint8 NHWC, C order"
METRICS = Path("metrics/customize.json")
GRIDS = Path("plots/customize")
RESULT = "result.json"
SAMPLES = "samples.png"
JOINT_METHODS = ("dreambooth", "custom_diffusion", "svdiff", "lora")  # fit on two concepts at once
PACKAGE = Path("manip/customize")
# Code every run executes; besides it, a run executes its method's module and what that imports
# from the package (`method_code`).
SHARED_CODE = ("manip/customize/__init__.py", "manip/customize/evaluate.py", "manip/customize/world.py",
               "manip/training")


@dataclass(frozen=True)
class Run:
    method: str
    concepts: tuple[str, ...]
    variant: str = ""  # "", "no_prior" (DreamBooth ablation), "merge" (Custom Diffusion), "union" (Cones)

    @property
    def folder(self) -> str:
        return f"{self.method}_{self.variant}" if self.variant else self.method

    @property
    def name(self) -> str:
        return f"{self.folder}/{'+'.join(self.concepts)}"

    @property
    def combines(self) -> tuple[Run, ...]:
        """The single-concept runs whose artifacts this run combines without training."""
        if self.variant in ("merge", "union"):
            return tuple(Run(self.method, (c,)) for c in self.concepts)
        return ()


def plan(c: CustomizeParams) -> list[list[Run]]:
    """Waves of runs: everything that trains, then what combines finished artifacts."""
    trains = [Run(m, (k,)) for m in c.methods for k in c.concepts]
    if c.drift_ablation and "dreambooth" in c.methods:
        trains += [Run("dreambooth", (k,), "no_prior") for k in c.concepts]
    combines = []
    for pair in c.pairs:
        trains += [Run(m, tuple(pair)) for m in c.methods if m in JOINT_METHODS]
        if "custom_diffusion" in c.methods:
            combines.append(Run("custom_diffusion", tuple(pair), "merge"))
        if "cones" in c.methods:
            combines.append(Run("cones", tuple(pair), "union"))
    return [trains, combines] if combines else [trains]


def find_run(c: CustomizeParams, name: str) -> Run:
    runs = {r.name: r for wave in plan(c) for r in wave}
    if name not in runs:
        raise StageInputError(f"no run {name!r} in params.yaml's customize section; runs: {', '.join(runs)}")
    return runs[name]


def method_config(params: Params, run: Run):
    """The method's config: its defaults, params.yaml's overrides, the project seed; an unknown
    or invalid field is named."""
    from manip.customize import METHODS

    cls = METHODS[run.method].Config
    overrides = dict(params.customize.settings.get(run.method, {}))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise StageInputError(f"customize.settings.{run.method}: unknown field(s) {unknown}; known: {sorted(known)}")
    if run.variant == "no_prior":
        overrides["prior_weight"] = 0.0
    if run.method == "elite":
        overrides.setdefault("encoder", str(ELITE_ENCODER))
    try:
        return cls(**{**overrides, "seed": params.seed})
    except (TypeError, ValueError) as err:
        raise StageInputError(f"customize.settings.{run.method}: {err}") from None


def run_fingerprint(params: Params, run: Run, base_digest: str) -> str:
    c = params.customize
    configs = ([dataclasses.asdict(method_config(params, r)) for r in run.combines] if run.combines else
               dataclasses.asdict(method_config(params, run)))
    spec = {"run": run.name, "code": code_digest(*SHARED_CODE, *method_code(run.method)), "config": configs,
            "base": base_digest, "encoder": files_digest(ELITE_ENCODER) if run.method == "elite" else None,
            "world": [params.world.artwork_dir, params.world.size], "seed": params.seed,
            "references": c.n_references, "prior": c.prior_images, "regularisation": c.regularisation_images,
            "class_images": CLASS_IMAGE_FORMAT if run.method == "dreambooth" and run.variant != "no_prior" else None,
            "evaluate": c.evaluate.model_dump()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def method_code(method: str) -> list[str]:
    """The package's modules a method's runs execute: its own and those it imports from the
    package, transitively. A run made by other code is not done; a change to one method's module
    leaves the other methods' runs done."""
    todo, seen = [method], set()
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            for node in ast.walk(ast.parse((ROOT / PACKAGE / f"{name}.py").read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 1:
                    # `from .base import x` names a module; `from . import base` names modules too
                    names = [node.module] if node.module else [a.name for a in node.names]
                    todo += [n for n in names if (ROOT / PACKAGE / f"{n}.py").is_file()]
    return sorted(str(PACKAGE / f"{name}.py") for name in seen)


def is_done(run: Run, fingerprint: str) -> bool:
    path = CONCEPTS / run.name / RESULT
    return path.is_file() and json.loads(path.read_text()).get("fingerprint") == fingerprint


class Workbench:
    """What every run in one process shares: the base model's files, scorers, renderer, and the
    concepts with their prompts."""

    def __init__(self, params: Params):
        from manip.customize.evaluate import Scorers
        from manip.metrics.clip_scores import ClipScorer
        from manip.metrics.judge import AttributeJudge
        from manip.runtime import device, set_threads
        from manip.world import Artwork, Renderer

        set_threads()
        self.params = params
        self.device = device()
        require(BASE / "model_index.json", "unet")
        self.base_digest = files_digest(BASE)
        self.scorers = Scorers(ClipScorer(require(CLIP, "evaluator"), device=self.device),
                               AttributeJudge.from_pretrained(require(JUDGE, "evaluator")).eval().to(self.device))
        self.renderer = Renderer(Artwork(params.world.artwork_dir), params.world.size)
        self._concepts: dict = {}

    def base(self):
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(BASE, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(self.device)

    def concept(self, name: str):
        from manip.customize.world import world_concept

        if name not in self._concepts:
            c = self.params.customize
            n = max(c.evaluate.n_prompts, c.prior_images, c.regularisation_images)
            self._concepts[name] = world_concept(name, self.renderer, c.n_references, n, self.params.seed)
        return self._concepts[name]

    def prior(self, run: Run):
        """DreamBooth: class images the base model generates for the class prompts (cached on disk
        by base model, prompts and seed); Custom Diffusion: real renders of class scenes."""
        import numpy as np

        from manip.customize import PriorSet

        if run.method not in ("dreambooth", "custom_diffusion") or run.variant == "no_prior":
            return None
        c = self.params.customize
        n = c.prior_images if run.method == "dreambooth" else c.regularisation_images
        cases = [case for k in run.concepts for case in self.concept(k).class_cases[:n]]
        captions = [case.template for case in cases]
        if run.method == "custom_diffusion":
            return PriorSet(np.stack([self.renderer.render_array(case.scene) for case in cases]), captions)
        return PriorSet(self.class_images(captions), captions)

    def class_images(self, captions: list[str]):
        import numpy as np
        import torch
        from safetensors.numpy import load_file

        from manip.training.checkpoint import atomic_write

        e = self.params.customize.evaluate
        key = hashlib.sha256(json.dumps([self.base_digest, captions, e.steps, e.guidance_scale, self.params.seed,
                                         CLASS_IMAGE_FORMAT]).encode()).hexdigest()[:16]
        path = PRIOR_CACHE / f"{key}.safetensors"
        if path.is_file():
            return load_file(str(path))["images"]
        generators = [torch.Generator().manual_seed(int(np.random.default_rng([self.params.seed, 7, i]).integers(2**62)))
                      for i in range(len(captions))]
        images = self.sample(self.base(), captions, generators)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_images(path, images)
        atomic_write(path.with_suffix(".json"), json.dumps(captions, indent=1))
        return images

    def sample(self, model, prompts: list[str], generators) -> np.ndarray:
        """Samples of a base pipeline or a customizer (whose `generate` may do more, as ELITE's
        local attention does), in batches, with the evaluation's steps and guidance."""
        import numpy as np

        from manip.customize import Customizer
        from manip.sampling import generate

        e = self.params.customize.evaluate
        draw = model.generate if isinstance(model, Customizer) else partial(generate, model)
        return np.concatenate([draw(prompts[i : i + e.batch_size], generators[i : i + e.batch_size],
                                    steps=e.steps, guidance_scale=e.guidance_scale)
                               for i in range(0, len(prompts), e.batch_size)])


def save_images(path: Path, images: np.ndarray) -> None:
    """uint8 NHWC images as safetensors, written whole, then renamed into place. safetensors
    writes an array's memory as it lies, whatever its strides, and decoded samples are a permuted
    view of NCHW memory: saved as they come, they read back as 3 x 3 tiles of single channels."""
    import numpy as np
    from safetensors.numpy import save_file

    tmp = path.with_suffix(".tmp")
    save_file({"images": np.ascontiguousarray(images)}, str(tmp))
    tmp.replace(path)


def generators_for(seed: int, group: int, n_cases: int, per_case: int):
    """The same noise for every method on one concept's prompts: a fair comparison."""
    import numpy as np
    import torch

    return [torch.Generator().manual_seed(int(np.random.default_rng([seed, group, c, s]).integers(2**62)))
            for c in range(n_cases) for s in range(per_case)]


def pair_group(first: str, second: str) -> int:
    """The noise group of a pair's prompts: every multi-concept run, and the base model's
    class-noun probe, sample them from the same noise."""
    from manip.customize.world import WORLD_CONCEPTS

    return 100 + WORLD_CONCEPTS.index(first) * 10 + WORLD_CONCEPTS.index(second)


def evaluate_run(bench: Workbench, customizer, run: Run) -> tuple[dict, np.ndarray]:
    """Scores of a finished customizer on its evaluation prompts (and, for one concept, the
    language-drift probe on class prompts)."""
    from manip.customize.evaluate import drift_scores, pair_scores
    from manip.customize.world import WORLD_CONCEPTS, pair_cases

    p, e = bench.params, bench.params.customize.evaluate
    k = e.images_per_prompt
    if len(run.concepts) == 2:
        cases = pair_cases(*run.concepts, e.n_prompts, p.seed)
        a, b = (next(c for c in customizer.concepts if c.name == n) for n in run.concepts)
        prompts = [case.template.format(customizer.phrase(a), customizer.phrase(b)) for case in cases for _ in range(k)]
        texts = [case.template.format(*run.concepts) for case in cases for _ in range(k)]
        images = bench.sample(customizer, prompts, generators_for(p.seed, pair_group(*run.concepts), len(cases), k))
        scores = pair_scores(bench.scorers, images, [c.scene for c in cases for _ in range(k)], texts)
        # Each concept on its own prompts, from the same model and with the single runs' seeds:
        # a concept the model did not learn, against two it learnt but cannot draw together.
        for key, name in zip(("first_alone", "second_alone"), run.concepts):
            scores[key] = concept_evaluation(bench, customizer, name)[0]["subject_accuracy"]
        return scores, images
    name = run.concepts[0]
    scores, images = concept_evaluation(bench, customizer, name)
    group, wc = WORLD_CONCEPTS.index(name), bench.concept(name)
    drift_cases = wc.class_cases[: e.n_prompts]
    drift_prompts = [case.template for case in drift_cases]
    drift_gens = generators_for(p.seed, 50 + group, len(drift_cases), 1)
    before = bench.sample(bench.base(), drift_prompts, drift_gens)
    after = bench.sample(customizer, drift_prompts, generators_for(p.seed, 50 + group, len(drift_cases), 1))
    scores["drift"] = drift_scores(bench.scorers, before, after, [c.scene for c in drift_cases], wc.concept.kind)
    return scores, images


def concept_evaluation(bench: Workbench, customizer, name: str) -> tuple[dict, np.ndarray]:
    """The customizer's concept `name` (one of several in a multi-concept model) on that
    concept's evaluation prompts: scores and samples."""
    from manip.customize.evaluate import concept_scores
    from manip.customize.world import WORLD_CONCEPTS

    p, e = bench.params, bench.params.customize.evaluate
    k = e.images_per_prompt
    wc = bench.concept(name)
    concept, cases = next(c for c in customizer.concepts if c.name == name), wc.cases[: e.n_prompts]
    prompts = [customizer.prompt(concept, case.template) for case in cases for _ in range(k)]
    texts = [case.template.format(name) for case in cases for _ in range(k)]
    scenes = [case.scene for case in cases for _ in range(k)]
    images = bench.sample(customizer, prompts, generators_for(p.seed, WORLD_CONCEPTS.index(name), len(cases), k))
    real = real_renders(bench, scenes)
    return concept_scores(bench.scorers, images, scenes, texts, wc.concept.images, real, concept.kind), images


def real_renders(bench: Workbench, scenes, stream: int = 11) -> np.ndarray:
    """Exact renders of the prompted scenes, each with fresh placement jitter drawn from
    (seed, stream, index): another stream gives another real set of the same scenes."""
    import numpy as np

    from manip.world import resample_layout

    return np.stack([bench.renderer.render_array(resample_layout(s, np.random.default_rng([bench.params.seed, stream, i])))
                     for i, s in enumerate(scenes)])


def reference_concept(concept, run: Run):
    """What the method learns from: every reference, or the first alone for ELITE, which
    customizes from one image by design."""
    return replace(concept, images=concept.images[:1], templates=concept.templates[:1]) if run.method == "elite" \
        else concept


def artifact_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name not in (RESULT, SAMPLES))


def execute(bench: Workbench, run: Run) -> dict:
    """Train (or combine), save, evaluate one run; returns its result."""
    import torch

    from manip.customize import METHODS, load_customizer
    from manip.customize.cones import union
    from manip.customize.custom_diffusion import merge
    from manip.runtime import PeakMemory
    from manip.training.checkpoint import atomic_write

    fingerprint = run_fingerprint(bench.params, run, bench.base_digest)
    out = CONCEPTS / run.name
    if is_done(run, fingerprint):
        return json.loads((out / RESULT).read_text())
    torch.manual_seed(bench.params.seed)
    pipe = bench.base()
    started = time.perf_counter()
    if run.combines:
        missing = [r.name for r in run.combines if not (CONCEPTS / r.name / "customizer.json").is_file()]
        if missing:
            raise StageInputError(f"{run.name} combines {missing}, which have not finished")
        with PeakMemory() as peak:
            if run.variant == "merge":
                templates = [t for k in run.concepts for t in bench.concept(k).concept.templates]
                reg = [case.template for k in run.concepts for case in bench.concept(k).class_cases]
                customizer = merge(pipe, [CONCEPTS / r.name for r in run.combines], templates, reg)
            else:
                customizer = union(pipe, [CONCEPTS / r.name for r in run.combines])
        fit = {"seconds": round(time.perf_counter() - started, 2), "peak_memory_mb": peak.megabytes,
               "trainable_parameters": 0, "resumed_from": 0, "final_loss": None}
    else:
        if run.method == "elite":
            require(ELITE_ENCODER / "config.json", "elite_encoder")
        customizer = METHODS[run.method](pipe, method_config(bench.params, run))
        report = customizer.fit([reference_concept(bench.concept(k).concept, run) for k in run.concepts],
                                CKPT / run.name / fingerprint, prior=bench.prior(run))
        fit = {"seconds": report.seconds, "peak_memory_mb": report.peak_memory_mb,
               "trainable_parameters": report.trainable_parameters, "resumed_from": report.resumed_from,
               "final_loss": round(report.history[-1]["loss"], 5) if report.history else None}
    customizer.save(out)
    # Scores come from the saved artifact loaded into a fresh base: what a user of it gets.
    loaded = load_customizer(bench.base(), out)
    scores, images = evaluate_run(bench, loaded, run)
    result = {"run": run.name, "method": run.folder, "concepts": list(run.concepts), "fingerprint": fingerprint,
              "seed": bench.params.seed,
              **fit, "artifact_bytes": artifact_bytes(out), "scores": scores}
    save_strip(out / SAMPLES, images[:8])
    atomic_write(out / RESULT, json.dumps(result, indent=1))
    return result


def prune(keep: set[str]) -> None:
    """Remove run folders params.yaml no longer plans, so models/concepts holds exactly the runs."""
    import shutil

    for manifest in CONCEPTS.glob("*/*/customizer.json"):
        folder = manifest.parent
        if f"{folder.parent.name}/{folder.name}" not in keep:
            shutil.rmtree(folder)
    for method in CONCEPTS.glob("*"):
        if method.is_dir() and not any(method.iterdir()):
            method.rmdir()


def save_strip(path: Path, images) -> None:
    import numpy as np
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp.png")
    Image.fromarray(np.concatenate(list(images), 1)).save(tmp)
    tmp.replace(path)


def method_grids(params: Params, results: dict[str, dict]) -> list[Path]:
    """One PNG per method: a row per run, the first reference then its first samples."""
    import numpy as np
    from PIL import Image

    from manip.customize.world import world_concept
    from manip.world import Artwork, Renderer

    renderer = Renderer(Artwork(params.world.artwork_dir), params.world.size)
    refs = {k: world_concept(k, renderer, params.customize.n_references, 1, params.seed).concept.images[0]
            for k in params.customize.concepts}
    by_method: dict[str, list[np.ndarray]] = {}
    for name, result in results.items():
        strip = np.asarray(Image.open(CONCEPTS / name / SAMPLES))
        first = refs.get(result["concepts"][0], np.zeros_like(strip[:, : strip.shape[0]]))
        by_method.setdefault(result["method"], []).append(np.concatenate([first, strip], 1))
    paths = []
    for method, rows in by_method.items():
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
        path = GRIDS / f"{method}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_strip(path, [np.concatenate(rows, 0)])
        paths.append(path)
    return paths


def real_rows(bench: Workbench) -> dict[str, dict]:
    """The ceiling: the scores of exact renders of each concept's evaluation prompts."""
    from manip.customize.evaluate import concept_scores

    e = bench.params.customize.evaluate
    rows = {}
    for name in bench.params.customize.concepts:
        wc = bench.concept(name)
        cases = wc.cases[: e.n_prompts]
        scenes = [c.scene for c in cases for _ in range(e.images_per_prompt)]
        texts = [c.template.format(name) for c in cases for _ in range(e.images_per_prompt)]
        images = real_renders(bench, scenes)
        other = real_renders(bench, scenes, stream=12)
        rows[name] = concept_scores(bench.scorers, other, scenes, texts, wc.concept.images, images, wc.concept.kind)
    return rows


def pair_rows(bench: Workbench) -> dict[str, dict]:
    """What the multi-concept table is measured against, per pair: exact renders of the pair's
    prompts (`real/<a>+<b>`), and the base model asked for the two concepts' class nouns in the
    same scenes (`base/<class a>+<class b>`): whether this model draws two objects side by side
    at all, before any concept is learnt."""
    from manip.customize.evaluate import pair_scores
    from manip.customize.world import CLASS_NOUNS, pair_cases
    from manip.world import caption

    p, e = bench.params, bench.params.customize.evaluate
    k = e.images_per_prompt
    base, rows = None, {}
    for a, b in p.customize.pairs:
        cases = pair_cases(a, b, e.n_prompts, p.seed)
        scenes = [c.scene for c in cases for _ in range(k)]
        texts = [c.template.format(a, b) for c in cases for _ in range(k)]
        rows[f"real/{a}+{b}"] = pair_scores(bench.scorers, real_renders(bench, scenes), scenes, texts)
        classes = [replace(s, objects=tuple(replace(o, name=CLASS_NOUNS[o.name]) for o in s.objects)) for s in scenes]
        prompts = [caption(s) for s in classes]
        base = base or bench.base()
        images = bench.sample(base, prompts, generators_for(p.seed, pair_group(a, b), len(cases), k))
        rows[f"base/{CLASS_NOUNS[a]}+{CLASS_NOUNS[b]}"] = pair_scores(bench.scorers, images, classes, prompts)
    return rows


def summary(results: dict[str, dict], real: dict[str, dict], pairs: dict[str, dict]) -> dict:
    """Per method, the mean over its single-concept runs of every score; multi-concept and drift
    tables beside."""
    import numpy as np

    singles, multi, drift = {}, {}, {}
    for result in results.values():
        if len(result["concepts"]) == 1:
            singles.setdefault(result["method"], []).append(result)
            drift[result["run"]] = result["scores"]["drift"]
        else:
            multi[result["run"]] = {**result["scores"], "seconds": result["seconds"]}
    table = {}
    for method, rows in singles.items():
        keys = [k for k, v in rows[0]["scores"].items() if not isinstance(v, dict)]
        table[method] = {k: round(float(np.mean([r["scores"][k] for r in rows])), 4) for k in keys}
        for k in ("seconds", "peak_memory_mb", "artifact_bytes", "trainable_parameters"):
            table[method][k] = round(float(np.mean([r[k] for r in rows])), 1)
    keys = list(next(iter(real.values())))
    table["real"] = {k: round(float(np.mean([r[k] for r in real.values()])), 4) for k in keys}
    return {"methods": table, "multi_concept": {**multi, **pairs}, "drift": drift}


def run_alone(name: str) -> str | None:
    """One run in a process of its own, as the Prefect flow fans them out: its peak memory is its
    own, not what earlier runs left in the allocator. None when it succeeded, else why not."""
    code = subprocess.call([sys.executable, "-m", "stages.customize", "--run", name])
    return None if code == 0 else f"exit status {code} (its error is printed above)"


def run(params: Params, only: str | None = None) -> dict | None:
    from manip.customize import ConceptError
    from manip.training.checkpoint import atomic_write

    c = params.customize
    bench = Workbench(params)
    if only:
        return execute(bench, find_run(c, only))
    results, failures = {}, {}
    for r in (r for wave in plan(c) for r in wave):
        try:
            if not is_done(r, run_fingerprint(params, r, bench.base_digest)):
                error = run_alone(r.name)  # one run's failure must not stop the others
                if error:
                    failures[r.name] = error
                    print(f"customize: run {r.name} failed: {error}", file=sys.stderr)
                    continue
            results[r.name] = json.loads((CONCEPTS / r.name / RESULT).read_text())
        except (StageInputError, ConceptError) as err:  # bad settings: the message says it all
            failures[r.name] = f"{type(err).__name__}: {err}"
            print(f"customize: run {r.name} failed: {failures[r.name]}", file=sys.stderr)
    if failures:
        raise StageInputError(f"{len(failures)} of {len(results) + len(failures)} customization runs failed: " +
                              "; ".join(f"{k} ({v})" for k, v in failures.items()))
    prune(set(results))
    real = real_rows(bench)
    metrics = {"runs": results, "real": real, **summary(results, real, pair_rows(bench))}
    method_grids(params, results)
    atomic_write(METRICS, json.dumps(metrics, indent=1))
    print(json.dumps(metrics["methods"], indent=1))
    return metrics


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.customize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="one run, e.g. lora/teapot (the Prefect flow's fan-out unit)")
    parser.add_argument("--list", action="store_true",
                        help="print the runs, in waves, with what each combines and whether it is done, as JSON")
    args = parser.parse_args()
    params = load_params()
    if args.list:
        base = files_digest(BASE)

        def done(r: Run) -> bool:
            try:
                return is_done(r, run_fingerprint(params, r, base))
            except StageInputError:  # settings the run itself will report
                return False

        print(json.dumps([[{"name": r.name, "needs": [n.name for n in r.combines], "done": done(r)} for r in wave]
                          for wave in plan(params.customize)]))
        return
    run(params, args.run)


if __name__ == "__main__":
    main(cli)
