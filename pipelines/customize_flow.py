"""Flow `customize`: every (method x concept) customization run of params.yaml's `customize`
section as its own `gpu`-tagged task (the tag's concurrency limit caps how many share the
GPUs), the multi-concept merges once their inputs exist, then `dvc repro customize`, which finds
every run done and records the artifacts, metrics and grids.

One failed run does not stop the others: the flow finishes the rest, publishes the table with
the failures marked, and fails at the end without recording the stage, so a re-run retries only
what failed (finished runs are skipped by their fingerprint).

    python -m pipelines.customize_flow [REPO]
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from .artifacts import grid_data_uri
from .dvc_tasks import GPU_SLOTS, dag_order, dvc_env, reproduce, stage_is_current, stream_command

STAGE = "customize"
METRICS = Path("metrics/customize.json")
CONCEPTS = Path("models/concepts")
GRIDS = Path("plots/customize")
TABLE_KEY = "customize-runs"
REPORT_KEY = "customize-report"


class CustomizeRunsFailed(RuntimeError):
    pass


@task(name="customize-run", task_run_name="customize {run}", tags=["gpu"], cache_policy=NONE)
def customize_run(repo: Path, run: str) -> dict:
    """One run in its own process, on a GPU of its own: trains (resuming from its checkpoint),
    saves, evaluates."""
    with GPU_SLOTS.claim() as env:
        stream_command([sys.executable, "-m", "stages.customize", "--run", run], repo, STAGE, env=env)
    return json.loads((repo / CONCEPTS / run / "result.json").read_text())


def planned_runs(repo: Path) -> list[list[dict]]:
    """Waves of {name, needs, done}: the runs of the checkout's params, as the stage plans them."""
    proc = subprocess.run([sys.executable, "-m", "stages.customize", "--list"], cwd=repo, env=dvc_env(),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"cannot list the customization runs: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_row(name: str, result: dict | None, error: str | None, status: str = "done") -> dict:
    row: dict = {"run": name, "status": "failed" if error else status}
    if result:
        scores = {k: v for k, v in result["scores"].items() if not isinstance(v, dict)}
        row.update({**scores, "seconds": result["seconds"], "peak_memory_mb": result["peak_memory_mb"],
                    "artifact_bytes": result["artifact_bytes"]})
    if error:
        row["error"] = error[-300:]
    return row


@task(name="publish-customize-report", cache_policy=NONE)
def publish_report(repo: Path) -> None:
    metrics = json.loads((repo / METRICS).read_text())
    methods = metrics["methods"]
    head = ["method", *next(iter(methods.values())).keys()]
    lines = ["# Customization runs", "", "Means over the single-concept runs of each method; `real` is the "
             "ceiling from exact renders of the prompted scenes.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join([m, *[str(v.get(k, "")) for k in head[1:]]]) + " |" for m, v in methods.items()]
    for grid in sorted((repo / GRIDS).glob("*.png")):
        lines += ["", f"## {grid.stem}", "", "Each row: a reference, then samples.", "",
                  f"![{grid.stem}]({grid_data_uri(grid)})"]
    create_markdown_artifact(markdown="\n".join(lines), key=REPORT_KEY, description="Customization results")


@flow(name="customize")
def customize_flow(repo: str = ".") -> dict[str, str]:
    """Fan out the customization runs, then record them with DVC.

    Args:
        repo: The project checkout to run in.
    """
    root = Path(repo).resolve()
    log = get_run_logger()
    order = dag_order(root, STAGE)
    outcome = reproduce(order[:-1], root)
    rows: list[dict] = []
    if not stage_is_current(STAGE, root):
        failed: set[str] = set()
        for wave in planned_runs(root):
            futures = {}
            for run in wave:
                if run["done"]:  # finished earlier with the same fingerprint: no process to start
                    result = json.loads((root / CONCEPTS / run["name"] / "result.json").read_text())
                    rows.append(run_row(run["name"], result, None, "done earlier"))
                    continue
                lost = sorted(set(run["needs"]) & failed)
                if lost:  # combining a run that failed cannot succeed
                    failed.add(run["name"])
                    rows.append(run_row(run["name"], None, f"not run: needs the failed run(s) {lost}"))
                    continue
                futures[run["name"]] = customize_run.submit(root, run["name"])
            for name, future in futures.items():
                future.wait()
                if future.state.is_completed():
                    rows.append(run_row(name, future.result(), None))
                else:
                    failed.add(name)
                    rows.append(run_row(name, None, str(future.state.message or future.state.name)))
                    log.error("customization run %s failed: %s", name, future.state.message)
        create_table_artifact(table=rows, key=TABLE_KEY, description="Customization runs of this flow run")
        if failed:
            raise CustomizeRunsFailed(f"{len(failed)} customization run(s) failed: {', '.join(sorted(failed))}")
    outcome.update(reproduce([STAGE], root))
    publish_report(root)
    return outcome


if __name__ == "__main__":
    customize_flow(*sys.argv[1:2])
