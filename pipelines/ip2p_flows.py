"""InstructPix2Pix flows: `ip2p-dataset` (captions -> edits -> paired images fanned out over
partitions -> filter -> published dataset), `ip2p-train` (fine-tune -> evaluate) and
`ip2p-retrain`, the scheduled one, which regenerates the dataset if its inputs changed and
retrains only when the published dataset version differs from the one the current model was
trained on.

Every stage is the DVC stage of dvc.yaml, run through `dvc repro`, so `dvc status` agrees with
the flows. Image-heavy tasks carry the `gpu` tag, whose concurrency limit `pipelines.server up`
sets to the number of GPUs; prefect.yaml deploys these flows to the `gpu` pool.

    python -m pipelines.ip2p_flows dataset|train|retrain [REPO] [N_PARTITIONS]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE

from .artifacts import grid_data_uri
from .dvc_tasks import (GPU_SLOTS, dag_order, dvc_command, dvc_env, reproduce, stage_is_current, stream_command,
                        stream_dvc)

DATASET = "data/ip2p/dataset"
MODEL = Path("models/ip2p")
DATASET_METRICS, PAIRS_PREVIEW = Path("metrics/ip2p_dataset.json"), Path("plots/ip2p_pairs.png")
EVAL_METRICS, EVAL_GRID = Path("metrics/ip2p_eval.json"), Path("plots/ip2p_eval_grid.png")


@task(name="ip2p-pairs-partition", task_run_name="pairs partition {partition}/{n_partitions}", tags=["gpu"],
      retries=1, retry_delay_seconds=10, cache_policy=NONE)
def pairs_partition(repo: Path, partition: int, n_partitions: int) -> None:
    """One worker's share of the pair shards, on a GPU of its own; a retry resumes at its first
    missing shard."""
    with GPU_SLOTS.claim() as env:
        stream_command([sys.executable, "-m", "stages.ip2p_pairs", "--partition", str(partition),
                        "--n-partitions", str(n_partitions)], repo, "ip2p_pairs", env=env)


@task(name="publish-ip2p-dataset", cache_policy=NONE)
def publish_dataset(repo: Path) -> None:
    metrics = json.loads((repo / DATASET_METRICS).read_text())
    rows = [{"count": k, "value": v} for k, v in metrics.items() if not isinstance(v, dict)]
    rows += [{"count": f"rejected: {k}", "value": v} for k, v in metrics["rejections"].items()]
    rows += [{"count": f"pairs: {k}", "value": v} for k, v in metrics["pairs_by_kind"].items()]
    create_table_artifact(table=rows, key="ip2p-dataset", description=f"{DATASET} counts and filter rejections")
    card = (repo / DATASET / "README.md").read_text()
    body = card.split("---\n", 2)[-1]
    preview = f"\n\n## Pairs\n\nInput above edited image.\n\n![pairs]({grid_data_uri(repo / PAIRS_PREVIEW)})\n"
    create_markdown_artifact(markdown=body + preview, key="ip2p-dataset-card", description=f"{DATASET}/README.md")


@task(name="publish-ip2p-eval", cache_policy=NONE)
def publish_eval(repo: Path) -> None:
    m = json.loads((repo / EVAL_METRICS).read_text())
    rows = [{"image_guidance": scale, **scores} for scale, scores in m["per_image_guidance"].items()]
    rows.append({"image_guidance": "input unchanged", **m["unchanged_input_baseline"]})
    create_table_artifact(table=rows, key="ip2p-eval", description=f"{EVAL_METRICS}: held-out EmojiWorld edits")
    head = list(rows[0])
    table = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
             *["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]]
    markdown = "\n".join([
        "# InstructPix2Pix evaluation", "", f"{m['n_cases']} held-out edits, {m['steps']} steps, text guidance "
        f"{m['guidance_scale']}; load the model with `StableDiffusionInstructPix2PixPipeline.from_pretrained(\"{MODEL}\")`.",
        "", *table, "", "## Edits", "", "Columns: " + " | ".join(m["grid_columns"]), "",
        f"![edits]({grid_data_uri(repo / EVAL_GRID)})", ""])
    create_markdown_artifact(markdown=markdown, key="ip2p-eval-report", description="InstructPix2Pix evaluation")


@task(name="push-ip2p-dataset", retries=2, retry_delay_seconds=10, cache_policy=NONE)
def push_dataset(repo: Path) -> bool:
    """`dvc push` of the published dataset to the default remote; False when none is configured."""
    import subprocess

    remote = subprocess.run(dvc_command("remote", "default"), cwd=repo, env=dvc_env(), capture_output=True, text=True)
    if remote.returncode != 0 or not remote.stdout.strip():
        get_run_logger().warning("no default DVC remote: %s not pushed (dvc remote add -d ...)", DATASET)
        return False
    stream_dvc(["push", "ip2p_dataset"], repo, "ip2p_dataset")
    return True


def _partitions(repo: Path, n_partitions: int | None) -> int:
    if n_partitions is not None:
        return n_partitions
    params = yaml.safe_load((repo / "params.yaml").read_text()) or {}
    return int(params.get("ip2p", {}).get("pairs", {}).get("n_partitions", 1))


@flow(name="ip2p-dataset")
def dataset_flow(repo: str = ".", n_partitions: int | None = None) -> dict[str, str]:
    """Build the published dataset and everything it needs, and push it to the default DVC
    remote; the pair shards are computed by parallel partition tasks before DVC records them.

    Args:
        repo: The project checkout to run in.
        n_partitions: Parallel partitions of the paired-image synthesis; empty for
            params.yaml's ip2p.pairs.n_partitions.
    """
    root = Path(repo).resolve()
    order = dag_order(root, "ip2p_dataset")
    before = order[: order.index("ip2p_pairs")]
    outcome = reproduce(before, root)
    if not stage_is_current("ip2p_pairs", root):
        n = _partitions(root, n_partitions)
        for future in [pairs_partition.submit(root, k, n) for k in range(n)]:
            future.result()
    outcome.update(reproduce(["ip2p_pairs", "ip2p_dataset"], root))
    push_dataset(root)
    publish_dataset(root)
    return outcome


def downstream(root: Path, stage: str) -> list[str]:
    """`stage` and every stage that depends on it, in DAG order."""
    return [s for s in dag_order(root) if stage in dag_order(root, s)]


@flow(name="ip2p-train")
def train_flow(repo: str = ".") -> dict[str, str]:
    """Fine-tune on the published dataset, then rerun what uses the model: its evaluation, the
    editing-methods comparison (which reuses every shard not made with models/ip2p) and the
    Russian-instruction model built on its UNet with that model's evaluation.

    Args:
        repo: The project checkout to run in.
    """
    root = Path(repo).resolve()
    outcome = reproduce(downstream(root, "ip2p_finetune"), root)
    publish_eval(root)
    return outcome


def _lock_md5(repo: Path, stage: str, section: str) -> str | None:
    """The md5 dvc.lock records for the dataset folder in `stage`'s deps or outs."""
    lock = repo / "dvc.lock"
    if not lock.is_file():
        return None
    entries = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage, {}).get(section, [])
    return next((e.get("md5") for e in entries if e.get("path") == DATASET), None)


def dataset_versions(repo: Path) -> tuple[str | None, str | None]:
    """(published dataset version, version the current model was trained on), from dvc.lock."""
    return _lock_md5(repo, "ip2p_dataset", "outs"), _lock_md5(repo, "ip2p_finetune", "deps")


@flow(name="ip2p-retrain")
def retrain(repo: str = ".", n_partitions: int | None = None) -> dict:
    """What the schedule runs: refresh the dataset, then retrain only if its version moved.

    Args:
        repo: The project checkout to run in.
        n_partitions: Parallel partitions of the paired-image synthesis; empty for params.yaml's.
    """
    log = get_run_logger()
    root = Path(repo).resolve()
    dataset_flow(repo, n_partitions)
    published, trained_on = dataset_versions(root)
    if published is not None and published == trained_on and (root / MODEL / "model_index.json").is_file():
        log.info("nothing new: models/ip2p was trained on the published dataset (version %s)", published[:10])
        return {"retrained": False, "dataset": published}
    log.info("dataset version %s differs from the model's (%s): retraining",
             (published or "none")[:10], (trained_on or "none")[:10])
    train_flow(repo)
    return {"retrained": True, "dataset": published}


FLOWS = {"dataset": dataset_flow, "train": train_flow, "retrain": retrain}

if __name__ == "__main__":
    name, *rest = sys.argv[1:] or ["dataset"]
    args = [rest[0]] if rest else []
    if len(rest) > 1 and name != "train":
        args.append(int(rest[1]))
    print(FLOWS[name](*args))
