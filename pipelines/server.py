"""Start and stop the local orchestration: a Prefect server on 127.0.0.1 (SQLite under
PREFECT_HOME, the UI served from the wheel), the `cpu` and `gpu` process work pools, the `gpu`
tag concurrency limit (one task per GPU), an automation that marks a run Crashed when its
heartbeats stop, the deployments of prefect.yaml, and one worker per pool.

    python -m pipelines.server up [--port 4200] [--gpus N]   # idempotent: reuses what runs
    python -m pipelines.server status
    python -m pipelines.server down

Processes run in their own sessions with pid files and logs under PREFECT_HOME/run and
PREFECT_HOME/logs; `down` signals each process group twice (a worker busy with a run may ignore
the first SIGTERM) and kills it if it is still there after a grace period.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .dvc_tasks import OFFLINE_ENV

HOST = "127.0.0.1"
POOLS = ("cpu", "gpu")
GPU_TAG = "gpu"
HEARTBEAT_SECONDS = 30  # Prefect's minimum
ZOMBIE = "crash-unresponsive-runs"


@dataclass(frozen=True)
class Layout:
    """Where the server keeps its state: everything under one PREFECT_HOME."""

    home: Path
    port: int

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def env(self, repo: Path) -> dict[str, str]:
        """Environment for the server, the workers and the flow runs they start: offline, this
        PREFECT_HOME and API, results stored beside it (the cache of `dvc-repro` tasks), and
        MANIP_REPO for prefect.yaml's pull step."""
        env = dict(os.environ)
        env.update(OFFLINE_ENV)
        env.update({"PREFECT_HOME": str(self.home), "PREFECT_API_URL": self.api_url, "PREFECT_UI_API_URL": self.api_url,
                    "PREFECT_SERVER_API_HOST": HOST, "PREFECT_SERVER_API_PORT": str(self.port),
                    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(self.home / "results"),
                    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS),
                    "MANIP_REPO": str(repo), "PYTHONUNBUFFERED": "1"})
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
        return env


def prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def healthy(layout: Layout, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{layout.api_url}/health", timeout=timeout) as r:
            return r.status == 200 and json.loads(r.read()) is True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def alive(layout: Layout, name: str) -> int | None:
    """The pid recorded for `name` if that process still runs."""
    path = layout.pid_file(name)
    try:
        pid = int(path.read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def spawn(layout: Layout, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> int:
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    layout.log_dir.mkdir(parents=True, exist_ok=True)
    with open(layout.log_dir / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    layout.pid_file(name).write_text(str(proc.pid))
    return proc.pid


def run_cli(cmd: list[str], env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        shown = " ".join(cmd[2:])
        raise RuntimeError(f"`{shown}` failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def gpu_count() -> int:
    """GPUs torch sees here; a machine without one still gets a limit of 1, so the `gpu` pool
    runs one heavy task at a time on its CPU."""
    import torch

    return max(1, torch.cuda.device_count())


def start_server(layout: Layout, repo: Path, env: dict[str, str], wait: float = 180.0) -> None:
    if healthy(layout):
        return
    if alive(layout, "server"):
        if healthy(layout, timeout=30.0):  # on a loaded machine the running server answers late
            return
        raise RuntimeError(f"a server process ({layout.pid_file('server')}) runs but {layout.api_url} "
                           "does not answer; `python -m pipelines.server down` first")
    spawn(layout, "server", prefect("server", "start", "--host", HOST, "--port", str(layout.port)), env, repo)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if healthy(layout):
            return
        if not alive(layout, "server"):
            break
        time.sleep(0.5)
    tail = (layout.log_dir / "server.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"the Prefect server did not become healthy at {layout.api_url}; log tail:\n{tail}")


def configure(layout: Layout, repo: Path, env: dict[str, str], gpus: int) -> None:
    """Work pools, the `gpu` tag limit, the zombie-run automation and the deployments; each
    step replaces what an earlier `up` made."""
    for pool in POOLS:
        run_cli(prefect("work-pool", "create", pool, "--type", "process", "--overwrite"), env, repo)
    if _has_limit(env, repo):
        run_cli(prefect("concurrency-limit", "delete", GPU_TAG), env, repo)
    run_cli(prefect("concurrency-limit", "create", GPU_TAG, str(gpus)), env, repo)
    crash_unresponsive_runs(layout)
    run_cli(prefect("--no-prompt", "deploy", "--all"), env, repo)


def crash_unresponsive_runs(layout: Layout) -> None:
    """An automation that marks a flow run Crashed when its heartbeats stop (its worker or host
    died with it): without one, such a run would show Running forever."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: layout.api_url}):
        try:
            Automation.read(name=ZOMBIE).delete()
        except ValueError:
            pass
        Automation(
            name=ZOMBIE, description="Marks a flow run Crashed after three missed heartbeats.",
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                        "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
                match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                within=timedelta(seconds=3 * HEARTBEAT_SECONDS)),
            actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                        message="No heartbeat for 3 periods: its worker or host stopped.")],
        ).create()


def _has_limit(env: dict[str, str], repo: Path) -> bool:
    proc = subprocess.run(prefect("concurrency-limit", "inspect", GPU_TAG), cwd=repo, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return proc.returncode == 0


def start_workers(layout: Layout, repo: Path, env: dict[str, str]) -> None:
    for pool in POOLS:
        name = f"worker-{pool}"
        if not alive(layout, name):
            spawn(layout, name, prefect("worker", "start", "--pool", pool, "--name", f"{pool}-{os.uname().nodename}"),
                  env, repo)


def up(repo: Path, layout: Layout, gpus: int | None = None) -> None:
    env = layout.env(repo)
    start_server(layout, repo, env)
    configure(layout, repo, env, gpus or gpu_count())
    start_workers(layout, repo, env)


def stop(layout: Layout, name: str, grace: float = 15.0) -> bool:
    """SIGTERM the process group twice, then SIGKILL it; True if something was running."""
    pid = alive(layout, name)
    layout.pid_file(name).unlink(missing_ok=True)
    if pid is None:
        return False
    for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + (grace / 2 if sig == signal.SIGTERM else grace)
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.2)
    return True


def down(layout: Layout) -> list[str]:
    return [name for name in [f"worker-{p}" for p in POOLS] + ["server"] if stop(layout, name)]


def status(layout: Layout) -> dict:
    return {"api": layout.api_url, "healthy": healthy(layout),
            **{name: alive(layout, name) for name in ["server", *[f"worker-{p}" for p in POOLS]]}}


def layout_from(args: argparse.Namespace) -> Layout:
    home = Path(os.environ.get("PREFECT_HOME") or Path(args.repo) / ".prefect").resolve()
    return Layout(home=home, port=args.port)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["up", "down", "status"])
    ap.add_argument("--repo", default=".", help="the project checkout the deployments run in")
    ap.add_argument("--port", type=int, default=int(os.environ.get("PREFECT_SERVER_API_PORT", 4200)))
    ap.add_argument("--gpus", type=int, default=None, help="the `gpu` tag limit (default: GPUs seen, at least 1)")
    args = ap.parse_args(argv)
    layout = layout_from(args)
    repo = Path(args.repo).resolve()
    if args.command == "up":
        up(repo, layout, args.gpus)
        print(f"Prefect UI and API at http://{HOST}:{layout.port} (state in {layout.home}); workers: "
              f"{', '.join(POOLS)}. Stop with `python -m pipelines.server down`.")
    elif args.command == "down":
        print("stopped: " + (", ".join(down(layout)) or "nothing was running"))
    else:
        print(json.dumps(status(layout), indent=1))


if __name__ == "__main__":
    main()
