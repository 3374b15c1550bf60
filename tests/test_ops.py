"""The local orchestration as a person uses it, on the tiny profile in a temporary repo:
`python -m pipelines.server up` starts a real Prefect server, the `cpu` and `gpu` pools, the
`gpu` limit, prefect.yaml's deployments and a worker per pool. A headless Chromium (Playwright)
opens the UI, starts a custom run of a deployment with a changed parameter, waits for it to
complete and opens its artifact; a worker killed mid-run leaves the run Crashed and a
re-trigger resumes from DVC; a server restart keeps the run history; `down` leaves no process.

Screenshots go to test-output/browser/.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from repo_fixtures import ROOT, dvc, dvc_status, make_repo, tool_env

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = ROOT / "test-output" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """The repo, its server's address, and the `pipelines.server` command line."""

    def __init__(self, repo: Path, home: Path, port: int):
        self.repo, self.home, self.port = repo, home, port
        self.url = f"http://127.0.0.1:{port}"

    def env(self) -> dict[str, str]:
        # No scheduler: a run near the weekly deployment's Monday 04:00 would take the gpu slot.
        return {**tool_env(), "PREFECT_HOME": str(self.home), "PREFECT_API_URL": f"{self.url}/api",
                "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}

    def server(self, command: str, timeout: float = 600) -> str:
        proc = subprocess.run([sys.executable, "-m", "pipelines.server", command, "--repo", str(self.repo),
                               "--port", str(self.port), "--gpus", "1"], cwd=self.repo, env=self.env(),
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    def api(self, path: str, body: dict | None = None, method: str | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.url}/api{path}", data=data, method=method or ("POST" if data else "GET"),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or "null")

    def deployment(self, flow: str, name: str) -> dict:
        return self.api(f"/deployments/name/{flow}/{name}")

    def trigger(self, flow: str, name: str, **parameters) -> str:
        dep = self.deployment(flow, name)
        run = self.api(f"/deployments/{dep['id']}/create_flow_run", {"parameters": parameters})
        return run["id"]

    def created_run(self, flow: str, name: str, timeout: float = 300, **parameters) -> str:
        """The id of the run a click created: the UI's redirect after Submit lags on a loaded
        server, so the server's record of the run is what the test waits for."""
        dep_id = self.deployment(flow, name)["id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = self.api("/flow_runs/filter", {"deployments": {"id": {"any_": [dep_id]}}})
            match = [r for r in runs if all(r["parameters"].get(k) == v for k, v in parameters.items())]
            if match:
                return match[0]["id"]
            time.sleep(1)
        raise AssertionError(f"no run of {name} with {parameters} after {timeout} s")

    def flow_run(self, run_id: str) -> dict:
        return self.api(f"/flow_runs/{run_id}")

    def wait(self, run_id: str, states: set[str], timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state_type"] in states:
                return run
            time.sleep(1)
        raise AssertionError(f"flow run {run_id} still {run['state_name']} after {timeout} s; "
                             f"worker log:\n{self.worker_log()[-3000:]}")

    def worker_log(self) -> str:
        return "\n".join((self.home / "logs" / f"worker-{p}.log").read_text(errors="replace")
                         for p in ("cpu", "gpu") if (self.home / "logs" / f"worker-{p}.log").is_file())

    def pid(self, name: str) -> int | None:
        path = self.home / "run" / f"{name}.pid"
        return int(path.read_text()) if path.is_file() else None


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops")
    repo = make_repo(root / "project")
    s = Stack(repo, root / "prefect-home", free_port())
    s.server("up")
    try:
        yield s
    finally:
        s.server("down")


def test_up_registers_pools_limit_and_deployments(stack):
    pools = {p["name"]: p["type"] for p in stack.api("/work_pools/filter", {})}
    assert pools["cpu"] == "process" and pools["gpu"] == "process"
    limits = {c["tag"]: c["concurrency_limit"] for c in stack.api("/concurrency_limits/filter", {})}
    assert limits["gpu"] == 1
    deployments = {(d["name"], d["work_pool_name"]): d for d in stack.api("/deployments/filter", {})}
    for name, pool in [("base-model", "gpu"), ("edit-benchmark", "gpu"), ("world", "cpu"), ("dataset", "gpu"),
                       ("train", "gpu"), ("weekly", "gpu"), ("concepts", "gpu")]:
        assert (name, pool) in deployments, sorted(deployments)
    weekly = deployments[("weekly", "gpu")]
    assert [s["schedule"]["cron"] for s in weekly["schedules"]] == ["0 4 * * 1"]
    schema = deployments[("base-model", "gpu")]["parameter_openapi_schema"]["properties"]
    assert "dvc.yaml stage" in schema["target"]["description"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed")
def test_custom_run_from_the_ui(stack):
    """Deployments -> base-model -> Run -> Custom run, target changed to `world`, Submit; the
    run completes on the `gpu` worker, and its `build-stages` artifact opens."""
    from playwright.sync_api import expect, sync_playwright

    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(stack.home.parent / "chromium-profile"), headless=True,
                                                   executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                   viewport={"width": 1400, "height": 1000})
        ctx.set_default_timeout(120_000)  # a loaded machine: the UI's requests queue behind the workers'
        expect.set_options(timeout=120_000)
        try:
            page = ctx.new_page()
            page.goto(f"{stack.url}/deployments", wait_until="networkidle")
            page.screenshot(path=SHOTS / "1-deployments.png")
            page.get_by_role("link", name="base-model", exact=True).click()
            page.wait_for_load_state("networkidle")
            page.get_by_role("button", name="Run", exact=True).click()
            page.get_by_text("Custom run").click()
            page.wait_for_load_state("networkidle")
            fields = "input, textarea"
            page.wait_for_function(f"() => [...document.querySelectorAll('{fields}')].some(i => i.value === 'evaluate_base')")
            inputs = page.locator(fields)
            target = next(inputs.nth(i) for i in range(inputs.count()) if inputs.nth(i).input_value() == "evaluate_base")
            target.fill("world")
            page.screenshot(path=SHOTS / "2-custom-run.png")
            page.get_by_role("button", name="Submit").click()
            run_id = stack.created_run("build", "base-model", target="world")
            run = stack.wait(run_id, {"COMPLETED", "FAILED", "CRASHED"}, timeout=600)
            assert run["state_type"] == "COMPLETED", stack.worker_log()[-3000:]
            page.goto(f"{stack.url}/runs/flow-run/{run_id}", wait_until="networkidle")
            expect(page.get_by_text("Completed").first).to_be_visible(timeout=30_000)
            page.screenshot(path=SHOTS / "3-run-completed.png")
            page.get_by_text("Artifacts", exact=True).click()
            page.get_by_text("build-stages").first.click()
            page.wait_for_load_state("networkidle")
            expect(page.get_by_text("world").first).to_be_visible()
            page.screenshot(path=SHOTS / "4-artifact.png", full_page=True)
        except Exception:
            page.screenshot(path=SHOTS / "failure.png", full_page=True)
            raise
        finally:
            ctx.close()
    assert "world" not in dvc_status(stack.repo)


def task_state(stack: Stack, run_id: str, name: str) -> str | None:
    runs = stack.api("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}})
    return next((r["state_type"] for r in runs if r["name"] == name), None)


def test_killed_worker_crashes_the_run_and_a_rerun_resumes(stack):
    """The `gpu` worker and its flow run killed (SIGKILL, as a host dying would) while the run
    trains the UNet: its heartbeats stop and the server's automation marks it Crashed. With the
    worker back, the same deployment again: the stages finished before the crash are not redone,
    and DVC ends up clean."""
    run_id = stack.trigger("build", "base-model", target="unet")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and task_state(stack, run_id, "repro unet") != "RUNNING":
        assert stack.flow_run(run_id)["state_type"] in {"SCHEDULED", "PENDING", "RUNNING"}, stack.worker_log()[-3000:]
        time.sleep(0.5)
    flow_pid = int(stack.flow_run(run_id)["infrastructure_pid"].rsplit(":", 1)[-1])
    os.killpg(stack.pid("worker-gpu"), signal.SIGKILL)
    try:
        os.killpg(os.getpgid(flow_pid), signal.SIGKILL)
    except ProcessLookupError:
        pass  # it was in the worker's process group
    crashed = stack.wait(run_id, {"CRASHED", "FAILED", "CANCELLED", "COMPLETED"}, timeout=300)
    assert crashed["state_type"] == "CRASHED", crashed["state_name"]
    stack.server("up")
    rerun = stack.wait(stack.trigger("build", "base-model", target="unet"), {"COMPLETED", "FAILED", "CRASHED"})
    assert rerun["state_type"] == "COMPLETED", stack.worker_log()[-3000:]
    latest = stack.api("/artifacts/filter", {"artifacts": {"key": {"any_": ["build-stages"]}},
                                             "sort": "CREATED_DESC", "limit": 1})[0]["data"]
    done = {r["stage"]: r["outcome"] for r in (json.loads(latest) if isinstance(latest, str) else latest)}
    assert done == {"world": "skipped", "text_encoder": "skipped", "vae": "skipped", "unet": "ran"}, done
    assert "Data and pipelines are up to date" in dvc(stack.repo, "status", "unet").stdout


def test_server_restart_keeps_history_and_down_stops_everything(stack):
    run_id = stack.trigger("build", "world")
    assert stack.wait(run_id, {"COMPLETED", "FAILED", "CRASHED"})["state_type"] == "COMPLETED"
    def history() -> set[str]:
        """Runs that have started: a redeploy replaces the schedule's future runs."""
        return {r["id"] for r in stack.api("/flow_runs/filter", {}) if r["state_type"] != "SCHEDULED"}

    before = history()
    assert run_id in before
    pids = [stack.pid(n) for n in ("server", "worker-cpu", "worker-gpu")]
    stack.server("down")
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    stack.server("up")
    assert before <= history()
