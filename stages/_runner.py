"""Entry-point wrapper: expected failures (bad params, missing inputs) print one clear line
instead of a traceback, and the offline environment is set before heavy imports."""
from __future__ import annotations

import os
import sys
from typing import Callable

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)


class StageInputError(RuntimeError):
    """An input the stage needs is missing or malformed; the message says how to fix it."""


def main(fn: Callable[[], object]) -> None:
    from manip.world.artwork import ArtworkMissing

    from .params import ParamsError

    try:
        fn()
    except (ParamsError, ArtworkMissing, StageInputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
