"""DAG stages: typed params in, files out. One `python -m stages.<name>` per dvc.yaml stage."""
