"""Diffusion image-manipulation library: world, models, training, metrics.

Nothing here imports Prefect or DVC or assumes a file layout, so every piece can be
used from a notebook against any diffusers checkpoint.
"""
