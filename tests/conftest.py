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


def tiny_sam_checkpoint(monkeypatch, tmp_path, model_type: str):
    """Register a tiny SAM architecture under ``model_type`` (the users' loading path stays the same)
    and save a seeded checkpoint of it; returns the checkpoint path."""
    import torch

    from mutdet.proposals import sam as sam_module

    monkeypatch.setitem(sam_module.SAM_BUILDERS, model_type, lambda: sam_module.build_sam_tiny(img_size=64, embed_dim=32))
    torch.manual_seed(0)
    path = tmp_path / "sam_tiny.pth"
    torch.save(sam_module.build_sam_tiny(img_size=64, embed_dim=32).state_dict(), path)
    return path
