"""A throwaway copy of the project as its own git + DVC repo, on the tiny profile.

Used by the end-to-end tests of `dvc repro` and of the Prefect flow: both run the real stages,
the real DVC CLI and (for the flow) a real Prefect server, in a temporary directory, so the
project's own dvc.lock, data/, models/ and checkpoints/ are never touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARTWORK = ROOT / ".cache" / "emoji-datasource-google"
TINY_PROFILE = ROOT / "profiles" / "tiny.yaml"
VENV_BIN = Path(sys.executable).parent
STAGES = ["world", "text_encoder", "vae", "unet", "evaluator", "evaluate_base", "edit_benchmark", "ip2p_captions",
          "ip2p_edits", "ip2p_pairs", "ip2p_dataset", "ip2p_finetune",
          "ip2p_evaluate", "elite_encoder", "customize", "multilingual", "edit_runs", "evaluate_multilingual",
          "ip2p_multilingual", "ip2p_evaluate_multilingual"]

COPY_DIRS = ("manip", "stages", "pipelines")
COPY_FILES = ("dvc.yaml", ".dvcignore", ".gitignore", "prefect.yaml")


def tool_env() -> dict[str, str]:
    """Environment for git / dvc / stage subprocesses: offline, one torch thread, the venv first."""
    env = dict(os.environ)
    env.pop("MANIP_PARAMS", None)
    env.update(MANIP_THREADS="1", HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", GIT_TERMINAL_PROMPT="0")
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    return env


# Catches a hang, nothing else: a whole tiny DAG takes minutes, more beside another test worker.
COMMAND_TIMEOUT = 1800


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a command; on failure, fail the test with the command and the tail of its output."""
    proc = subprocess.run(cmd, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-60:])
        pytest.fail(f"`{' '.join(cmd)}` exited with {proc.returncode} in {cwd}:\n{tail}", pytrace=False)
    return proc


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["dvc", *args], repo, check=check)


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run(["git", *args], repo)


def dvc_status(repo: Path) -> dict:
    """`dvc status --json` of the whole repo; {} when everything is up to date."""
    out = dvc(repo, "status", "--json").stdout.strip()
    return json.loads(out[out.index("{"):]) if "{" in out else {}


def require_tools() -> None:
    if not (ARTWORK / "emoji.json").is_file():
        pytest.skip(f"emoji artwork not installed at {ARTWORK}; run `make artwork`")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    if not (VENV_BIN / "dvc").exists():
        pytest.skip(f"dvc is not installed in {VENV_BIN}")


def make_repo(dest: Path) -> Path:
    """A fresh git + DVC repo at `dest` with the project's code, dvc.yaml and the tiny profile as
    params.yaml; the emoji artwork is symlinked, not copied. Nothing is reproduced yet."""
    require_tools()
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for d in COPY_DIRS:
        shutil.copytree(ROOT / d, dest / d, ignore=ignore)
    for f in COPY_FILES:
        shutil.copy2(ROOT / f, dest / f)
    shutil.copy2(TINY_PROFILE, dest / "params.yaml")
    (dest / ".cache").mkdir()
    (dest / ".cache" / ARTWORK.name).symlink_to(ARTWORK, target_is_directory=True)
    git(dest, "init", "-q")
    git(dest, "config", "user.email", "tests@example.invalid")
    git(dest, "config", "user.name", "manip tests")
    git(dest, "config", "commit.gpgsign", "false")
    dvc(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "tiny project copy")
    return dest


def tree_digest(path: Path) -> dict[str, str]:
    """{relative file path: sha256} of every file under `path`."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}
