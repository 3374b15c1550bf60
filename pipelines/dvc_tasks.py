"""Prefect tasks that drive DVC, plus the DAG order read from dvc.yaml.

Every stage runs as `dvc repro --single-item <stage>` in a subprocess with `cwd=repo`: DVC then
records the stage in dvc.lock exactly as a workstation `dvc repro` would, so after a flow run
`dvc status` is clean and vice versa. The DVC CLI in a subprocess is safe to call from Prefect
worker threads; DVC's Python API (`dvc.repo.Repo`) is not thread-safe and changes the cwd.
Stage tasks are cached by the content of the stage's inputs (pipelines/stage_cache.py), so a
flow re-run with nothing new skips every stage without starting DVC.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import queue
import threading
from collections import deque
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

import yaml
from filelock import FileLock
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from .stage_cache import dvc_paths, inputs_key, outputs_state, stage_spec

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
TAIL_LINES = 40

# DVC / OS messages of failures worth retrying: another DVC process holds the repo lock, or the
# filesystem hiccuped. Anything else (a stage's own error, bad params, a missing input) fails at once.
TRANSIENT = re.compile(
    r"Unable to acquire lock|is busy, it is being blocked by|Input/output error|Resource temporarily unavailable"
    r"|Stale file handle|Too many open files|Device or resource busy"
)


class DvcStageError(RuntimeError):
    """A DVC command failed for a reason retrying will not fix; the message ends with its stderr tail."""

    def __init__(self, message: str, stage: str = "", returncode: int | None = None, tail: str = ""):
        super().__init__(message)
        self.stage, self.returncode, self.tail = stage, returncode, tail


class DvcIOError(OSError):
    """A DVC command failed on locking or I/O; `repro_stage` retries these."""


def dvc_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for DVC and the stage commands it spawns: offline, unbuffered, and with this
    interpreter's bin directory first on PATH so `python -m stages.<name>` (dvc.yaml's `cmd`)
    runs in the same virtualenv as the flow."""
    env = dict(os.environ if base is None else base)
    for k, v in OFFLINE_ENV.items():
        env.setdefault(k, v)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TQDM_MININTERVAL", "10")  # progress bars become a log line every 10 s, not every step
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, *[p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]])
    return env


def dvc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("pipelines.dvc")


def _pump(stream, log, level: int, sink: deque | list, on_line=None) -> None:
    for line in stream:
        line = line.rstrip()
        if line:
            sink.append(line)
            log.log(level, line)
            if on_line is not None:
                on_line(line)


class Progress:
    """A Prefect progress artifact of the task run, fed by the percentages of the stage's
    progress bars (tqdm, on its stderr): a long training or generation stage shows how far it
    is in the UI. Updated in steps of at least `step` percent; nothing outside a task run."""

    PERCENT = re.compile(r"(\d{1,3})%\|")

    def __init__(self, stage: str, step: float = 5.0):
        self.id, self.last, self.step = None, 0.0, step
        if TaskRunContext.get() is not None:
            self.id = create_progress_artifact(0.0, description=f"`{stage}`: the running stage's progress bar")

    def __call__(self, line: str) -> None:
        found = self.PERCENT.findall(line)
        if self.id is None or not found:
            return
        pct = float(min(100, int(found[-1])))
        if pct >= self.last + self.step or (pct == 100 and self.last < 100):
            update_progress_artifact(self.id, pct)
            self.last = pct

    def finish(self) -> None:
        if self.id is not None and self.last < 100:
            update_progress_artifact(self.id, 100.0)


def _failure(cmd_args: list[str], stage: str, rc: int, tail: str) -> Exception:
    cmd = " ".join(cmd_args)
    msg = f"`{cmd}` failed with exit code {rc} in stage {stage!r}; last lines of stderr:\n{tail or '(empty)'}"
    if TRANSIENT.search(tail):
        return DvcIOError(msg)
    return DvcStageError(msg, stage=stage, returncode=rc, tail=tail)


def repo_lock(repo: Path) -> FileLock:
    """One DVC command at a time per checkout, across flows and processes: DVC holds its repo
    lock for a whole stage and refuses a second command meanwhile, so two flows triggered at
    once on one workspace queue here instead of failing."""
    path = Path(repo) / ".dvc" / "tmp" / "manip-flows.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(path)


def stream_dvc(args: list[str], repo: Path, stage: str = "") -> list[str]:
    """Run a DVC command in `repo`, logging stdout and stderr line by line as they arrive.
    Returns the stdout lines; raises DvcIOError / DvcStageError with the stderr tail on failure."""
    with repo_lock(repo):
        return stream_command(dvc_command(*args), repo, stage, shown=["dvc", *args])


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


class GpuSlots:
    """One GPU for each `gpu`-tagged task of this flow process that runs at once.

    The tag's concurrency limit (the machine's GPU count) says how many such tasks run, not on
    which device: a child process that sees every GPU puts its work on cuda:0, so N runs would
    share one card while the others idle. A task claims a free device for its child
    (`CUDA_VISIBLE_DEVICES`, within any list the worker itself was given) and waits while none is
    free; with one GPU or none nothing changes."""

    def __init__(self, count: Callable[[], int] = cuda_device_count):
        self._count = count
        self._free: queue.Queue[str] | None = None  # None: one GPU or none, nothing to share out
        self._read = False
        self._lock = threading.Lock()

    def _pool(self) -> queue.Queue[str] | None:
        with self._lock:
            if not self._read:
                visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
                devices = visible or [str(i) for i in range(self._count())]
                if len(devices) > 1:
                    self._free = queue.Queue()
                    for d in devices:
                        self._free.put(d)
                self._read = True
            return self._free

    @contextmanager
    def claim(self) -> Iterator[dict[str, str]]:
        """Environment for the child: its own GPU, or nothing to add."""
        pool = self._pool()
        if pool is None:
            yield {}
            return
        device = pool.get()
        try:
            yield {"CUDA_VISIBLE_DEVICES": device}
        finally:
            pool.put(device)


GPU_SLOTS = GpuSlots()


def stream_command(cmd: list[str], repo: Path, stage: str = "", shown: list[str] | None = None,
                   env: dict[str, str] | None = None) -> list[str]:
    """`stream_dvc` for any command of the project's interpreter environment (a stage module
    run directly, e.g. one partition of a sharded stage); `env` adds to its environment."""
    log = _logger()
    stdout: list[str] = []
    stderr: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(cmd, cwd=repo, env={**dvc_env(), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, bufsize=1,
                            errors="replace")
    progress = Progress(stage or " ".join(shown or cmd))
    out_thread = threading.Thread(target=_pump, args=(proc.stdout, log, logging.INFO, stdout), daemon=True)
    out_thread.start()
    _pump(proc.stderr, log, logging.INFO, stderr, progress)  # in the task's own thread: it owns the run context
    rc = proc.wait()
    out_thread.join()
    if rc != 0:
        raise _failure(shown or cmd, stage, rc, "\n".join(stderr))
    progress.finish()
    return stdout


def _retry_on_io_error(task, task_run, state) -> bool:
    try:
        state.result()
    except OSError:
        return True
    except Exception:
        return False
    return False


def _inputs_key(context, parameters: dict) -> str:
    return inputs_key(Path(parameters["repo"]), parameters["stage"])


@task(name="dvc-repro", task_run_name="repro {stage}", retries=2, retry_delay_seconds=5,
      retry_condition_fn=_retry_on_io_error, cache_key_fn=_inputs_key, persist_result=True,
      result_serializer="json")
def repro_stage(stage: str, repo: Path) -> dict:
    """`dvc repro --single-item <stage>` in `repo`. Returns {"status": 'ran' | 'skipped', **the
    stage's outputs state}; 'ran' includes outputs DVC restored from its run-cache. Cached by the
    content of the stage's inputs (see stage_cache). Lock and I/O failures are retried twice; a
    failing stage is not."""
    out = stream_dvc(["repro", "--single-item", stage], Path(repo), stage)
    status = "skipped" if any("didn't change, skipping" in line for line in out) else "ran"
    return {"status": status, **outputs_state(Path(repo), stage)}


def stage_status(stage: str, repo: Path) -> dict:
    """`dvc status <stage> --json`: {} when the stage's lock entry matches its deps, params and outs."""
    proc = subprocess.run(dvc_command("status", stage, "--json"), cwd=repo, env=dvc_env(), capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise _failure(["dvc", "status", stage, "--json"], stage, proc.returncode,
                       "\n".join(proc.stderr.strip().splitlines()[-TAIL_LINES:]))
    text = proc.stdout.strip()
    return json.loads(text[text.index("{"):]) if "{" in text else {}


def stage_is_current(stage: str, repo: Path) -> bool:
    return not stage_status(stage, Path(repo))


def is_gpu_stage(repo: Path, stage: str) -> bool:
    """dvc.yaml marks the stages that use a GPU with `meta: {gpu: true}`."""
    return bool((stage_spec(Path(repo), stage).get("meta") or {}).get("gpu"))


def reproduce(stages: Iterable[str], repo: Path) -> dict[str, str]:
    """Each stage in turn; {stage: 'ran' | 'skipped'}. A stage whose inputs' content key was
    seen before is skipped without asking DVC, provided its outputs and lock entry are still
    what that run left; GPU stages run as `gpu`-tagged tasks, under that tag's concurrency limit."""
    log = _logger()
    outcome: dict[str, str] = {}
    repo = Path(repo)
    for stage in stages:
        runner = repro_stage.with_options(tags=["gpu"]) if is_gpu_stage(repo, stage) else repro_stage
        state = runner(stage, repo, return_state=True)
        result = state.result()
        if state.name == "Cached":
            if {k: result.get(k) for k in ("outs", "lock")} == outputs_state(repo, stage):
                log.info("%s: inputs unchanged since a finished run (cached), skipped", stage)
                outcome[stage] = "skipped"
                continue
            log.info("%s: cached outcome no longer matches its outputs or dvc.lock; running it", stage)
            result = runner.with_options(refresh_cache=True)(stage, repo)
        outcome[stage] = result["status"]
    return outcome


# --- DAG order from dvc.yaml -------------------------------------------------------------------

def _norm(wdir: str, path: str) -> PurePosixPath:
    return PurePosixPath(os.path.normpath(os.path.join(wdir, path)))


def _overlap(a: PurePosixPath, b: PurePosixPath) -> bool:
    return a == b or a in b.parents or b in a.parents


def dag_order(repo: str | Path, target: str | None = None) -> list[str]:
    """Stage names of `repo/dvc.yaml` in topological order (ties keep dvc.yaml order).

    A stage depends on another when one of its deps is, contains or lies inside one of the
    other's outs, metrics or plots, which is how DVC builds its graph. With `target`, only that
    stage and its ancestors. Templated (`foreach` / `matrix`) stages are not expanded here.
    """
    spec = yaml.safe_load((Path(repo) / "dvc.yaml").read_text()) or {}
    stages: dict = spec.get("stages") or {}
    outs, deps = {}, {}
    for name, s in stages.items():
        wdir = s.get("wdir", ".") if isinstance(s, dict) else "."
        body = s.get("do", s) if isinstance(s, dict) else {}
        outs[name] = [_norm(wdir, p) for key in ("outs", "metrics", "plots") for p in dvc_paths(body.get(key))]
        deps[name] = [_norm(wdir, p) for p in dvc_paths(body.get("deps"))]
    upstream = {n: [m for m in stages if m != n and any(_overlap(d, o) for d in deps[n] for o in outs[m])]
                for n in stages}
    if target is not None:
        if target not in stages:
            raise KeyError(f"stage {target!r} is not in {Path(repo) / 'dvc.yaml'} (stages: {', '.join(stages)})")
        keep, todo = set(), [target]
        while todo:
            n = todo.pop()
            if n not in keep:
                keep.add(n)
                todo.extend(upstream[n])
    else:
        keep = set(stages)
    templated = [n for n in keep if isinstance(stages[n], dict) and ({"foreach", "matrix"} & set(stages[n]))]
    if templated:
        raise ValueError(f"templated stages {templated} are not expanded here; list them explicitly in dvc.yaml")
    order: list[str] = []
    pending = [n for n in stages if n in keep]
    while pending:
        ready = [n for n in pending if all(u in order or u not in keep for u in upstream[n])]
        if not ready:
            raise ValueError(f"dvc.yaml has a dependency cycle among {pending}")
        order.append(ready[0])
        pending.remove(ready[0])
    return order
