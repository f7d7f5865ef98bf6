"""Helpers shared by the stages: code version, parameter hashes, logging set-up."""
from __future__ import annotations

import functools
import logging
import subprocess
from pathlib import Path

import mutdet

log = logging.getLogger("mutdet")


@functools.cache
def code_version() -> str:
    """``mutdet <version>`` plus the git commit (``+dirty`` if modified) when run from a checkout."""
    version = f"mutdet {mutdet.__version__}"
    repo = Path(mutdet.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version} (git {commit}{'+dirty' if dirty else ''})"


def params_hash(params: dict) -> str:
    """Stable short hash of JSON-serialisable parameters (the key of resume parts)."""
    from mutdet.config import params_digest

    return params_digest(params)[:16]


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
