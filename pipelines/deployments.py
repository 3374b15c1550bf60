"""Deployments of the project's flows. `ip2p-retrain/scheduled` runs the retraining flow on a cron
schedule (default Mondays 04:00 UTC); it retrains only when the published dataset changed.

    python -m pipelines.deployments serve [REPO] [CRON]   # serve it from this process
"""
from __future__ import annotations

import sys
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from .ip2p_flows import retrain

RETRAIN_CRON = "0 4 * * 1"


def retrain_deployment(repo: str | Path = ".", cron: str = RETRAIN_CRON, name: str = "scheduled") -> RunnerDeployment:
    return retrain.to_deployment(
        name=name, cron=cron, parameters={"repo": str(Path(repo).resolve())}, tags=["ip2p", "retrain"],
        description="Refresh the InstructPix2Pix dataset; fine-tune and evaluate again only if its version changed.")


if __name__ == "__main__":
    command, *rest = sys.argv[1:] or ["serve"]
    if command != "serve":
        sys.exit(f"unknown command {command!r}; usage: python -m pipelines.deployments serve [REPO] [CRON]")
    serve(retrain_deployment(*rest))
