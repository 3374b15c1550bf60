"""Flow `build`: the DVC DAG as a Prefect flow, from rendered world to the benchmarks.

It runs every stage of dvc.yaml (or only `target` and what it needs), in DAG order read from
dvc.yaml (so a stage added there is picked up), each through `dvc repro --single-item`; stages
DVC reports as up to date are skipped. Then it publishes the results people look at as Prefect
artifacts: `build-stages` (table: what each stage did in this run), `base-model-metrics` (table) and `base-model-report` (markdown with the sample grid
inline) from `evaluate_base`, `edit-benchmark` (table: inversion x edit type) and
`edit-benchmark-report` (markdown with the edit grid) from `edit_benchmark`, `edit-runs` (table) and
`edit-runs-report` (markdown: tables and a grid per edit type) from `edit_runs`, and the InstructPix2Pix
dataset card and evaluation (see pipelines/ip2p_flows.py).

    python -m pipelines.build_flow [REPO] [TARGET]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from .artifacts import grid_data_uri
from .dvc_tasks import dag_order, reproduce
from .ip2p_flows import DATASET_METRICS, EVAL_METRICS, publish_dataset, publish_eval
from .report import (BASE_METRICS, CAPTIONS, EDIT_GRID, EDIT_METRICS, EDIT_TABLE_METRICS, GRID, MODEL, RUNS_GRIDS,
                     RUNS_METRICS, base_headline, edit_rows, flatten, markdown_table, runs_kind_rows, runs_reuse_rows,
                     runs_rows)

METRICS_KEY = "base-model-metrics"
REPORT_KEY = "base-model-report"
EDIT_KEY = "edit-benchmark"
EDIT_REPORT_KEY = "edit-benchmark-report"
STAGES_KEY = "build-stages"


def report_markdown(repo: Path, metrics: dict) -> str:
    flat = flatten(metrics)
    k = metrics.get("images_per_caption", "?")
    lines = [
        "# Base model report", "",
        f"Model: `{MODEL}` in `{repo}`; load it with `StableDiffusionPipeline.from_pretrained(\"{MODEL}\")`.", "",
        base_headline(metrics) + ".", "",
        "## Metrics", "", "| metric | value |", "| --- | --- |",
        *[f"| {name} | {value} |" for name, value in flat.items()], "",
    ]
    if (repo / GRID).is_file():
        lines += ["## Samples", "",
                  f"Each row: real render | VAE reconstruction | {k} generated samples for the caption below.", "",
                  f"![base model samples]({grid_data_uri(repo / GRID)})", ""]
    if (repo / CAPTIONS).is_file():
        captions = [c for c in (repo / CAPTIONS).read_text().splitlines() if c.strip()]
        lines += ["Row captions:", "", *[f"{i}. {c}" for i, c in enumerate(captions, 1)], ""]
    return "\n".join(lines)


@task(name="publish-base-report", cache_policy=NONE)
def publish_base_report(repo: Path) -> dict[str, str]:
    """Table and markdown artifacts from metrics/base.json and the sample grid."""
    metrics = json.loads((repo / BASE_METRICS).read_text())
    rows = [{"metric": name, "value": value} for name, value in flatten(metrics).items()]
    table_id = create_table_artifact(table=rows, key=METRICS_KEY,
                                     description=f"{BASE_METRICS} of the embedded base model ({repo})")
    report_id = create_markdown_artifact(markdown=report_markdown(repo, metrics), key=REPORT_KEY,
                                         description=f"Base model metrics and samples ({repo})")
    return {METRICS_KEY: str(table_id), REPORT_KEY: str(report_id)}


def edit_markdown(repo: Path, metrics: dict) -> str:
    rows = edit_rows(metrics)
    head = ["inversion", "edit", *EDIT_TABLE_METRICS]
    lines = [
        "# EmojiWorld-Edit", "",
        f"{metrics.get('n_cases', '?')} cases, complete: {metrics.get('complete')}; model `{MODEL}`; "
        f"settings: `{json.dumps(metrics.get('settings', {}))}`.", "",
        "| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
        *["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows], "",
    ]
    if (repo / EDIT_GRID).is_file():
        columns = " | ".join(metrics.get("grid_columns", []))
        lines += ["## Edits", "", f"Columns: {columns}; two cases per edit type.", "",
                  f"![edits]({grid_data_uri(repo / EDIT_GRID)})", ""]
    return "\n".join(lines)


def publish_table_and_report(repo: Path, metrics_path: Path, rows, markdown, keys: tuple[str, str],
                             what: tuple[str, str]) -> dict[str, str]:
    """A table artifact (`rows(metrics)`) and a markdown one (`markdown(repo, metrics)`) from a
    stage's metrics file."""
    metrics = json.loads((repo / metrics_path).read_text())
    table_id = create_table_artifact(table=rows(metrics), key=keys[0], description=f"{metrics_path}: {what[0]} ({repo})")
    report_id = create_markdown_artifact(markdown=markdown(repo, metrics), key=keys[1], description=f"{what[1]} ({repo})")
    return {keys[0]: str(table_id), keys[1]: str(report_id)}


@task(name="publish-edit-report", cache_policy=NONE)
def publish_edit_report(repo: Path) -> dict[str, str]:
    """Table (inversion x edit type) and markdown artifacts from metrics/edit_benchmark.json."""
    return publish_table_and_report(repo, EDIT_METRICS, edit_rows, edit_markdown, (EDIT_KEY, EDIT_REPORT_KEY),
                                    ("means per inversion and edit type", "EmojiWorld-Edit results and edits"))


RUNS_KEY = "edit-runs"
RUNS_REPORT_KEY = "edit-runs-report"


def runs_markdown(repo: Path, metrics: dict) -> str:
    lines = [
        "# Single-image editing methods on EmojiWorld-Edit", "",
        f"{metrics.get('n_cases', '?')} cases, the same for every method; complete: {metrics.get('complete')}.", "",
        markdown_table(runs_rows(metrics)), "", "## Edit success per edit type", "",
        markdown_table(runs_kind_rows(metrics)), "", "## A second edit of the same image (cached parts)", "",
        markdown_table(runs_reuse_rows(metrics)), "",
    ]
    columns = " | ".join(metrics.get("grid_columns", []))
    for grid in sorted((repo / RUNS_GRIDS).glob("*.png")):
        lines += [f"## {grid.stem}", "", f"Columns: {columns}.", "", f"![{grid.stem}]({grid_data_uri(grid)})", ""]
    return "\n".join(lines)


@task(name="publish-edit-runs", cache_policy=NONE)
def publish_runs_report(repo: Path) -> dict[str, str]:
    """Table (method x metric) and markdown (tables + one grid per edit type) from metrics/edit_runs.json."""
    return publish_table_and_report(repo, RUNS_METRICS, runs_rows, runs_markdown, (RUNS_KEY, RUNS_REPORT_KEY),
                                    ("single-image editing methods", "Single-image editing methods, tables and grids"))


# stage -> (the metrics file it writes, the task that turns it into artifacts)
PUBLISHERS = {"evaluate_base": (BASE_METRICS, publish_base_report), "edit_benchmark": (EDIT_METRICS, publish_edit_report),
              "ip2p_dataset": (DATASET_METRICS, publish_dataset), "ip2p_evaluate": (EVAL_METRICS, publish_eval),
              "edit_runs": (RUNS_METRICS, publish_runs_report)}


@flow(name="build")
def build(repo: str = ".", target: str | None = None) -> dict[str, str]:
    """Reproduce `target` and its upstream stages through DVC; returns {stage: 'ran' | 'skipped'}
    in the order they were considered.

    Args:
        repo: The project checkout to run in (a deployment runs in the worker's MANIP_REPO).
        target: A dvc.yaml stage, e.g. `evaluate_base`, `edit_benchmark`, `ip2p_evaluate`;
            empty for every stage.
    """
    logger = get_run_logger()
    root = Path(repo).resolve()
    order = dag_order(root, target)
    logger.info("stages in DAG order: %s", " -> ".join(order))
    outcome = reproduce(order, root)
    create_table_artifact(table=[{"stage": stage, "outcome": result} for stage, result in outcome.items()],
                          key=STAGES_KEY, description=f"Stages of this run in DAG order ({root})")
    for stage, (metrics, publish) in PUBLISHERS.items():
        if stage in order and (root / metrics).is_file():
            publish(root)
    return outcome


if __name__ == "__main__":
    print(build(*sys.argv[1:3]))
