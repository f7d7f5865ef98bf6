import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["plane", "ship", "storage-tank", "small-vehicle", "large-vehicle"]


@pytest.fixture
def dota_config():
    """A config dict for a DOTA-format dataset rooted at a given folder."""

    def make(root, **dataset):
        ds = {"root": str(root), "format": "dota", "classes": CLASSES,
              "splits": {"train": {"list": "train.txt"}}}
        ds.update(dataset)
        return {"results": str(Path(root).parent / "results"), "datasets": {"d": ds}}

    return make


def python():
    return sys.executable
