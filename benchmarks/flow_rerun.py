"""A `build` flow re-run with nothing to do: the content-keyed task cache against asking DVC.

In a repo whose stages up to TARGET are current, times (alternating, REPEATS times each):
  - `dvc repro TARGET`, which hashes and checks every stage and finds nothing to do;
  - the `build` flow with an empty task cache, where every stage task runs `dvc repro --single-item`;
  - the `build` flow again with the cache its previous run left, where no stage asks DVC.
Each flow run is its own process with its own temporary Prefect home (the ephemeral API
included, as `python -m pipelines.build_flow` runs on a workstation). Writes
benchmarks/results/flow_rerun.json.

    python -m benchmarks.flow_rerun [--target edit_benchmark] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from manip.training.checkpoint import atomic_write
from pipelines.dvc_tasks import dag_order, dvc_env

OUT = Path("benchmarks/results/flow_rerun.json")


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"`{' '.join(cmd)}` failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return seconds, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="edit_benchmark")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    stages = dag_order(".", args.target)
    flow = [sys.executable, "-m", "pipelines.build_flow", ".", args.target]
    times: dict[str, list[float]] = {"dvc_repro": [], "flow_uncached": [], "flow_cached": []}
    for _ in range(args.repeats):
        home = Path(tempfile.mkdtemp(prefix="prefect-home-"))
        env = {**dvc_env(), "PREFECT_HOME": str(home), "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results")}
        env.pop("PREFECT_API_URL", None)
        try:
            seconds, out = timed([sys.executable, "-m", "dvc", "repro", args.target], env)
            if "Running stage" in out:
                sys.exit(f"stages up to {args.target} were not current; run `dvc repro {args.target}` first")
            times["dvc_repro"].append(seconds)
            for key in ("flow_uncached", "flow_cached"):
                seconds, out = timed(flow, env)
                if "'ran'" in out:
                    sys.exit(f"the flow ran a stage: {out[-2000:]}")
                times[key].append(seconds)
        finally:
            shutil.rmtree(home, ignore_errors=True)
    median = {k: round(statistics.median(v), 2) for k, v in times.items()}
    result = {
        "target": args.target, "stages": len(stages), "repeats": args.repeats, "cpus": os.cpu_count(),
        "seconds_median": median, "seconds_all": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "cached_vs_uncached_flow": round(median["flow_uncached"] / median["flow_cached"], 2),
        "cached_flow_vs_dvc_repro": round(median["dvc_repro"] / median["flow_cached"], 2),
    }
    atomic_write(OUT, json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
