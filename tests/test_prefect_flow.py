"""The Prefect flow `build` against a real (temporary) Prefect server and the real DVC CLI,
on the tiny profile in a temporary repo: it runs the DAG, leaves DVC with nothing to do, skips
everything on a second run, and publishes its artifacts."""
from __future__ import annotations

import asyncio
import json

import pytest

from repo_fixtures import ROOT, STAGES, dvc, dvc_status, make_repo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    from prefect.settings import (PREFECT_HOME, PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW,
                                  PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings)
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    # Tasks called outside a flow (the failure tests) log locally without a warning.
    with temporary_settings(updates={PREFECT_HOME: home, PREFECT_RESULTS_LOCAL_STORAGE_PATH: home / "results",
                                     PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW: "ignore"}):
        with prefect_test_harness(server_startup_timeout=180):
            yield


@pytest.fixture(scope="module")
def flow_repo(prefect_server, tmp_path_factory):
    """(repo, return value of the first flow run)."""
    from pipelines.build_flow import build

    repo = make_repo(tmp_path_factory.mktemp("flow") / "project")
    return repo, build(str(repo))


def test_dag_order_follows_dvc_yaml():
    from pipelines.dvc_tasks import dag_order

    assert dag_order(ROOT) == STAGES
    assert dag_order(ROOT, "unet") == ["world", "text_encoder", "vae", "unet"]
    assert dag_order(ROOT, "world") == ["world"]


def test_first_run_reproduces_every_stage(flow_repo):
    _, result = flow_repo
    assert result == {stage: "ran" for stage in STAGES}


def test_dvc_agrees_with_prefect(flow_repo):
    repo, _ = flow_repo
    lock = (repo / "dvc.lock").read_text()
    for stage in STAGES:
        assert f"\n  {stage}:\n" in lock
    assert dvc_status(repo) == {}
    out = dvc(repo, "repro")
    assert "Running stage" not in out.stdout + out.stderr


def test_second_run_skips_every_stage(flow_repo):
    from pipelines.build_flow import build

    repo, _ = flow_repo
    assert build(str(repo)) == {stage: "skipped" for stage in STAGES}


def test_artifacts_published(flow_repo):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    repo, _ = flow_repo

    async def read(key):
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    tables = asyncio.run(read("base-model-metrics"))
    reports = asyncio.run(read("base-model-report"))
    assert tables and reports
    assert tables[0].type == "table" and reports[0].type == "markdown"
    rows = tables[0].data if isinstance(tables[0].data, list) else json.loads(tables[0].data)
    metrics = {row["metric"]: row["value"] for row in rows}
    assert metrics["clip_t.ratio"] == json.loads((repo / "metrics/base.json").read_text())["clip_t"]["ratio"]
    report = reports[0].data
    assert "data:image/png;base64," in report
    first_caption = (repo / "plots/base_grid_captions.txt").read_text().splitlines()[0]
    assert first_caption in report

    edit_tables = asyncio.run(read("edit-benchmark"))
    edit_reports = asyncio.run(read("edit-benchmark-report"))
    assert edit_tables and edit_reports
    rows = edit_tables[0].data if isinstance(edit_tables[0].data, list) else json.loads(edit_tables[0].data)
    bench = json.loads((repo / "metrics/edit_benchmark.json").read_text())
    methods = list(bench["inversions"])
    assert [(r["inversion"], r["edit"]) for r in rows][:2] == [(methods[0], "all"), (methods[0], "object")]
    assert len(rows) == len(methods) * 7
    first = next(r for r in rows if r["inversion"] == "null-text" and r["edit"] == "all")
    assert first["recon_psnr"] == bench["inversions"]["null-text"]["overall"]["recon_psnr"]

    runs_tables, runs_reports = asyncio.run(read("edit-runs")), asyncio.run(read("edit-runs-report"))
    assert runs_tables and runs_reports
    rows = runs_tables[0].data if isinstance(runs_tables[0].data, list) else json.loads(runs_tables[0].data)
    runs = json.loads((repo / "metrics/edit_runs.json").read_text())
    assert [r["method"] for r in rows] == list(runs["results"])
    assert {"imagic", "instruct-pix2pix", "pix2pix-zero"} <= set(runs["results"])
    assert runs_reports[0].data.count("data:image/png;base64,") == len(list((repo / "plots/edit_runs").glob("*.png")))
    assert "| null-text | all |" in edit_reports[0].data and "data:image/png;base64," in edit_reports[0].data


@pytest.fixture(scope="module")
def scratch_repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("scratch") / "project")


def _run_count(state) -> int:
    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return (await client.read_task_run(state.state_details.task_run_id)).run_count

    return asyncio.run(read())


def test_failed_stage_is_not_retried(prefect_server, scratch_repo):
    """A stage DVC cannot run fails at once, with DVC's own error (the stderr tail) in the message."""
    from pipelines.dvc_tasks import DvcStageError, repro_stage

    state = repro_stage("no_such_stage", scratch_repo, return_state=True)
    assert state.is_failed()
    with pytest.raises(DvcStageError, match="no_such_stage") as err:
        state.result()
    assert "ERROR" in err.value.tail
    assert _run_count(state) == 1


def test_repo_lock_contention_is_retried(prefect_server, scratch_repo):
    """While another process holds the DVC repo lock, DVC fails with 'Unable to acquire lock':
    an I/O failure, which the task retries twice before giving up."""
    import zc.lockfile

    from pipelines.dvc_tasks import DvcIOError, repro_stage

    (scratch_repo / ".dvc" / "tmp").mkdir(exist_ok=True)
    lock = zc.lockfile.LockFile(str(scratch_repo / ".dvc" / "tmp" / "lock"))
    try:
        state = repro_stage("world", scratch_repo, return_state=True)
    finally:
        lock.close()
    with pytest.raises(DvcIOError, match="Unable to acquire lock"):
        state.result()
    assert _run_count(state) == 3


def _artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    return asyncio.run(read())


def test_ip2p_artifacts_published(flow_repo):
    repo, _ = flow_repo
    card = _artifact("ip2p-dataset-card")
    assert card and "# InstructPix2Pix pairs" in card[0].data and "data:image/png;base64," in card[0].data
    report = _artifact("ip2p-eval-report")
    assert report and "| image_guidance |" in report[0].data
    table = _artifact("ip2p-eval")[0]
    rows = table.data if isinstance(table.data, list) else json.loads(table.data)
    assert rows[-1]["image_guidance"] == "input unchanged"


def test_retrain_only_when_the_dataset_changes(flow_repo):
    """The scheduled flow: nothing new -> no training; more captions -> a new dataset version
    (pairs fanned out over two partition tasks) -> fine-tune and evaluate again."""
    import yaml

    from pipelines.ip2p_flows import dataset_versions, retrain

    repo, _ = flow_repo
    assert retrain(str(repo)) == {"retrained": False, "dataset": dataset_versions(repo)[0]}
    remote = repo.parent / "remote"
    dvc(repo, "remote", "add", "-d", "local", str(remote))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["ip2p"]["captions"]["n"] = 8
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    before = dataset_versions(repo)[0]
    result = retrain(str(repo), 2)
    published, trained_on = dataset_versions(repo)
    assert result == {"retrained": True, "dataset": published} and published != before and trained_on == published
    assert len(list((repo / "data/ip2p/pairs").glob("shard-*/shard.json"))) == 4  # 8 edits, shards of 2
    assert dvc_status(repo) == {}
    assert retrain(str(repo))["retrained"] is False
    pushed = dvc(repo, "status", "--cloud", "ip2p_dataset").stdout
    assert "up to date" in pushed.lower() or "Cache and remote 'local' are in sync" in pushed, pushed
    assert any(remote.rglob("*"))


def test_gpu_stages_run_as_gpu_tagged_tasks(flow_repo):
    """dvc.yaml's `meta: {gpu: true}` stages are the task runs the `gpu` limit applies to."""
    from prefect.client.orchestration import get_client

    from pipelines.dvc_tasks import is_gpu_stage

    async def read():
        async with get_client() as client:
            return await client.read_task_runs()

    tags = {}
    for run in asyncio.run(read()):
        tags.setdefault(run.name, set()).update(run.tags)
    gpu = {stage for stage in STAGES if is_gpu_stage(ROOT, stage)}
    assert {"unet", "evaluate_base", "edit_benchmark", "ip2p_finetune"} <= gpu and "world" not in gpu
    for stage in STAGES:
        assert ("gpu" in tags[f"repro {stage}"]) == (stage in gpu), stage


def test_gpu_limit_holds_under_a_burst(prefect_server):
    """Four flow runs started at once, each with two `gpu`-tagged tasks, under a `gpu` limit of
    1: the tasks' run intervals never overlap."""
    import threading
    import time

    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    intervals: list[tuple[float, float]] = []

    @task(tags=["gpu"])
    def heavy() -> None:
        start = time.monotonic()
        time.sleep(0.5)
        intervals.append((start, time.monotonic()))

    @flow
    def burst() -> None:
        for future in [heavy.submit(), heavy.submit()]:
            future.result()

    async def limit(value: int | None):
        async with get_client() as client:
            if value is None:
                await client.delete_concurrency_limit_by_tag("gpu")
                return
            await client.create_concurrency_limit(tag="gpu", concurrency_limit=value)
            # Task engines acquire tag slots from the global limit `tag:gpu` the server derives
            # from the tag limit: start the burst once that one is in place, as it is long
            # before any run after `pipelines.server up`.
            for _ in range(100):
                try:
                    if (await client.read_global_concurrency_limit_by_name("tag:gpu")).limit == value:
                        return
                except ObjectNotFound:
                    pass
                await asyncio.sleep(0.1)
            raise AssertionError("the server never showed the global limit tag:gpu")

    asyncio.run(limit(1))
    burst()  # one run alone first: the engine's view of the limit is warm before the burst
    intervals.clear()
    try:
        threads = [threading.Thread(target=burst) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        asyncio.run(limit(None))
    assert len(intervals) == 8
    ordered = sorted(intervals)
    assert all(b[0] >= a[1] for a, b in zip(ordered, ordered[1:])), ordered


def test_two_flows_at_once_share_a_workspace(prefect_server, tmp_path):
    """Two `build` flows started together on one checkout (overlapping stages): their DVC
    commands queue on the checkout's lock instead of failing on DVC's, both complete, and
    dvc.lock holds every stage with `dvc status` clean."""
    import threading

    from pipelines.build_flow import build

    repo = make_repo(tmp_path / "project")
    results: dict[str, dict] = {}

    def run(target: str) -> None:
        results[target] = build(str(repo), target)

    threads = [threading.Thread(target=run, args=(t,)) for t in ("text_encoder", "vae")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {"text_encoder", "vae"}, "a flow failed"
    assert sorted([results["text_encoder"]["world"], results["vae"]["world"]]) == ["ran", "skipped"]
    assert results["text_encoder"]["text_encoder"] == "ran" and results["vae"]["vae"] == "ran"
    lock = (repo / "dvc.lock").read_text()
    assert all(f"\n  {s}:\n" in lock for s in ("world", "text_encoder", "vae"))
    assert "Data and pipelines are up to date" in dvc(repo, "status", "text_encoder", "vae").stdout


def test_long_stages_report_progress(flow_repo):
    """Each stage task keeps a progress artifact fed by the stage's progress bars; every stage of
    the first build stands at 100%."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterType

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])))

    # Other tests in this session make runs fail on purpose; their bars stay where they stopped.
    finished = {a.description for a in asyncio.run(read()) if float(a.data) == 100.0}
    for stage in STAGES:
        assert f"`{stage}`: the running stage's progress bar" in finished, (stage, sorted(finished))


def _latest_rows(key: str) -> dict[str, dict]:
    table = max(_artifact(key), key=lambda a: a.created)
    rows = table.data if isinstance(table.data, list) else json.loads(table.data)
    return {r["run"]: r for r in rows}


def test_customize_flow_fans_out_and_reports_a_failed_run(flow_repo):
    """The `customize` flow on the built tiny repo: with Cones misconfigured, its runs fail while
    the Textual Inversion runs (re-run: their settings changed) finish; the runs table marks
    both, the flow fails and DVC records nothing. With Cones fixed, a second flow run trains only
    the failed runs and `dvc repro customize` records the stage."""
    import yaml

    from pipelines.customize_flow import CustomizeRunsFailed, customize_flow

    repo, _ = flow_repo
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    settings = params["customize"]["settings"]
    settings["textual_inversion"]["lr"] = 0.02
    # Other settings than the build's: the fixed Cones runs cannot reuse the build's results.
    good_cones = {**settings["cones"], "steps": settings["cones"]["steps"] + 1}
    settings["cones"]["search_rounds"] = 0
    try:
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        with pytest.raises(CustomizeRunsFailed, match="cones/teapot"):
            customize_flow(str(repo))
        rows = _latest_rows("customize-runs")
        assert rows["cones/teapot"]["status"] == "failed" and "search_rounds" in rows["cones/teapot"]["error"]
        assert rows["textual_inversion/teapot"]["status"] == "done"
        assert "customize" in dvc_status(repo)
        result = repo / "models/concepts/textual_inversion/teapot/result.json"
        finished = result.stat().st_mtime_ns
        settings["cones"] = good_cones
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
        assert customize_flow(str(repo))["customize"] == "ran"
        assert result.stat().st_mtime_ns == finished  # done runs are not redone
        rows = _latest_rows("customize-runs")
        assert {name for name, row in rows.items() if row["status"] == "done"} == {"cones/teapot", "cones/mosaic"}
        assert rows["textual_inversion/teapot"]["status"] == "done earlier"
        assert dvc_status(repo) == {}
    finally:
        (repo / "params.yaml").write_text(original)
