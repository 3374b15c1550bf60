"""Stage `edit_runs`: every single-image editing method (Imagic, UniTune, SINE, pix2pix-zero) and
the baselines (Prompt-to-Prompt through an inversion, InstructPix2Pix) on the same
EmojiWorld-Edit cases: the first `n_cases` of the edit benchmark's list, the same for all.

Inputs: models/base, models/ip2p and models/multilingual (when a run edits with them; a run's
`language: ru` writes its captions, instructions and sentence sets in Russian), models/clip, models/judge,
data/world/test and the emoji artwork. Outputs: metrics/edit_runs.json (means per run overall
and per edit type, seconds per reusable part and per edit, peak memory, bytes stored per image,
the speed-up of a second edit of the same image), plots/edit_runs_cases.csv (one row per run x
case) and plots/edit_runs/<edit type>.png (input | ground truth | each run).

Work is kept per (run, case) under data/edit_runs/ and resumed; `limit_per_run` caps how many
shards one invocation computes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from manip.runtime import device, set_threads
from manip.training.checkpoint import atomic_write

from ._runner import StageInputError, main
from .common import require
from .params import Params, load_params

MODELS = {"base": Path("models/base"), "ip2p": Path("models/ip2p"), "multilingual": Path("models/multilingual")}
CLIP, JUDGE = Path("models/clip"), Path("models/judge")
TEST = Path("data/world/test")
WORK = Path("data/edit_runs")
METRICS = Path("metrics/edit_runs.json")
CASES_CSV = Path("plots/edit_runs_cases.csv")
GRIDS = Path("plots/edit_runs")
STAGE_OF = {"base": "unet", "ip2p": "ip2p_finetune", "multilingual": "multilingual"}


def sentence_sets(params: Params, phrase, models: dict[str, str]):
    """pix2pix-zero's sentence sets per (edit, case, language): from the scene grammar, or from
    an LLM, whose answers must fit the tokenizer of the model that reads that language
    (`models`: language -> model name)."""
    from manip.ip2p.sentences import OpenAISentences, rules_sentences, scene_sentences
    from manip.multilingual.corpus import CAPTION_WRITERS

    s = params.edit_runs.sentences
    if s.backend == "rules" and s.contexts == "scene":
        return lambda edit, case, language: scene_sentences(edit, language)
    if s.backend == "rules":
        def rules(edit, case, language):
            seed = int(np.random.default_rng([params.seed, 10, case.index]).integers(2**31))
            return rules_sentences(edit, s.n, seed, language)

        return rules
    from transformers import CLIPTokenizer

    from manip.ip2p.llm import LLMError

    from .ip2p_edits import llm_settings

    try:
        llms = {language: OpenAISentences(llm_settings(s.openai), s.openai.cache_dir, CLIPTokenizer.from_pretrained(
                    require(MODELS[model] / "tokenizer", STAGE_OF[model]))) for language, model in models.items()}
    except LLMError as err:
        raise StageInputError(str(err)) from None

    def ask(edit, case, language):
        write = CAPTION_WRITERS[language][1]
        try:
            return llms[language](write(edit.source, 0), write(edit.target, 0), phrase(edit, case, language), s.n)
        except LLMError as err:
            raise StageInputError(f"case {case.case_id}: {err}") from None

    return ask


def run(params: Params, progress: bool = True) -> dict:
    p = params.edit_runs
    set_threads()
    from manip.editing.single import EDITORS
    from manip.editing.single.runs import MethodRun
    from manip.ip2p.rules import INSTRUCTION_WRITERS

    # Settings are checked against each method's config before any model loads.
    runs = [MethodRun(label, r.method, r.settings, r.model, r.language) for label, r in p.runs.items()]
    for r in runs:
        r.config()

    def phrase(edit, case, language) -> str:
        rng = np.random.default_rng([params.seed, 8, case.index, edit.kind == case.kind])
        return INSTRUCTION_WRITERS[language](edit, rng)

    # The sentence source (an LLM's key and endpoint) is checked before any model loads too.
    readers: dict[str, str] = {}  # language -> the model of its first run that reads sentence sets
    for r in runs:
        if EDITORS[r.method].uses_sentences:
            readers.setdefault(r.language, r.model)
    sentences = sentence_sets(params, phrase, readers) if readers else None

    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline

    from manip.editing.benchmark import KINDS, aggregate, build_cases, cases_csv, edit_grid
    from manip.editing.single.runs import RUN_METRICS, MethodRuns, reuse_summary
    from manip.metrics.clip_scores import ClipScorer
    from manip.metrics.judge import AttributeJudge
    from manip.world import Artwork, Renderer
    from manip.world.dataset import load_split
    from manip.world.edits import EditNotApplicable, apply_edit

    loaders = {"base": StableDiffusionPipeline, "ip2p": StableDiffusionInstructPix2PixPipeline,
               "multilingual": StableDiffusionPipeline}
    pipes = {}
    for name in dict.fromkeys(r.model for r in runs):
        require(MODELS[name] / "model_index.json", STAGE_OF[name])
        pipe = loaders[name].from_pretrained(MODELS[name], safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe.to(device())
    require(CLIP / "config.json", "evaluator")
    require(JUDGE / "config.json", "evaluator")
    require(TEST / "images.npy", "world")
    scorer = ClipScorer(CLIP, device=device())
    judge = AttributeJudge.from_pretrained(JUDGE).eval().to(device())
    renderer = Renderer(Artwork(params.world.artwork_dir), params.world.size)
    cases = build_cases(load_split(TEST).scenes, params.seed, p.n_cases)

    def second_edit(case):
        """Another edit of the same scene: the next kind that applies to it."""
        for kind in KINDS[KINDS.index(case.kind) + 1 :] + KINDS[: KINDS.index(case.kind)]:
            try:
                return apply_edit(case.source, kind, np.random.default_rng([params.seed, 9, case.index]))
            except EditNotApplicable:
                continue
        raise ValueError(f"no second edit applies to case {case.case_id}")

    runner = MethodRuns(pipes, renderer, scorer, judge, runs, WORK, params.seed, phrase, second_edit,
                        sentences, p.reuse_cases)
    computed, remaining = runner.run(cases, limit=p.limit_per_run, progress=progress)
    labels = list(p.runs)
    records = runner.records(cases, labels)
    metrics = {
        "complete": remaining == 0, "n_cases": len(cases),
        "n_cases_by_kind": {k: sum(c.kind == k for c in cases) for k in KINDS},
        "shards": {"done": len(records), "remaining": remaining},
        "runs": {label: {"method": r.method, "model": r.model, "language": r.language, "settings": r.settings}
                 for label, r in p.runs.items()},
        "sentences": p.sentences.model_dump(include={"backend", "contexts", "n"}) if sentences else None,
        "grid_columns": ["input", "ground truth", *labels],
        "results": aggregate(records, labels, metrics=RUN_METRICS),
        "reuse": reuse_summary(records),
    }
    atomic_write(CASES_CSV, cases_csv(records, RUN_METRICS))
    for kind in KINDS:
        grid = edit_grid(runner, cases, labels, per_kind=3, kinds=[kind])
        if grid is not None:
            GRIDS.mkdir(parents=True, exist_ok=True)
            tmp = GRIDS / f".{kind}.tmp.png"
            grid.save(tmp)
            tmp.replace(GRIDS / f"{kind}.png")
    atomic_write(METRICS, json.dumps(metrics, indent=1))
    print(json.dumps({label: v["overall"] for label, v in metrics["results"].items()}, indent=1))
    print(f"{computed} (run, case) shards computed in this run")
    if remaining:
        print(f"{remaining} (run, case) shards left: run the stage again to continue")
    return metrics


if __name__ == "__main__":
    main(lambda: run(load_params()))
