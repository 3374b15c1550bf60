"""Prefect flows over the DVC stages (the top layer; see README "Architecture").

Flows never import stage code: they ask DVC to run a stage (`dvc repro --single-item`), so the
Prefect UI, `dvc repro` on a workstation and a schedule all run the same command and share one
dvc.lock, and whichever runs second finds nothing to do.
"""
