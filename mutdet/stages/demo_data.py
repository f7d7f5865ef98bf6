"""Stage ``demo-data``: the embedded datasets, so the default run needs nothing from outside.

* ``synthetic``: a deterministic DOTA-format dataset of large aerial-like images (``mutdet.synthetic``).
* ``deepforest``: the real aerial tree-crown images (MIT licence) shipped in the PyPI package
  ``deepforest==2.1.0`` under ``deepforest/data/``, with their Pascal VOC XML labels. The package is
  installed with ``--no-deps`` and never imported (its dependencies are huge): only its folder is read.

Each writes ``<root>/MANIFEST.json`` last; the workflow uses it as the dataset's completion marker.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from mutdet.config import Config
from mutdet.io.atomic import write_json, write_text
from mutdet.stages.common import code_version, log
from mutdet.synthetic import write_dota_dataset

# Annotated images of deepforest 2.1.0 and the split each goes to (the large scene trains, the
# other large scene tests; one small plot in each).
DEEPFOREST_SPLITS = {
    "train": ["2019_YELL_2_528000_4978000_image_crop2", "OSBS_029"],
    "test": ["2019_YELL_2_541000_4977000_image_crop", "SOAP_061"],
}


def deepforest_data_dir() -> Path:
    spec = importlib.util.find_spec("deepforest")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the deepforest package is not installed; install its shipped data with "
            "`pip install --no-deps deepforest==2.1.0` (make install does this)")
    return Path(spec.submodule_search_locations[0]) / "data"


def copy_deepforest(root: Path) -> dict:
    """Copy deepforest's annotated PNG + VOC XML files to ``root/images`` and ``root/Annotations``."""
    src = deepforest_data_dir()
    counts = {}
    for split, ids in DEEPFOREST_SPLITS.items():
        for image_id in ids:
            for name, sub in ((f"{image_id}.png", "images"), (f"{image_id}.xml", "Annotations")):
                if not (src / name).is_file():
                    raise FileNotFoundError(f"{src / name}: expected in deepforest==2.1.0")
                (root / sub).mkdir(parents=True, exist_ok=True)
                tmp = root / sub / f".{name}.tmp"
                shutil.copyfile(src / name, tmp)
                tmp.replace(root / sub / name)
        write_text(root / f"{split}.txt", "".join(f"{i}\n" for i in ids))
        counts[split] = ids
    return {"source": str(src), "splits": counts}


def run(cfg: Config, *, dataset: str) -> dict:
    ds = cfg.dataset(dataset)
    root = ds.root
    root.mkdir(parents=True, exist_ok=True)
    if ds.source == "synthetic":
        s = ds.synthetic
        summary = write_dota_dataset(root, num_train=s.num_train, num_test=s.num_test, size=s.image_size,
                                     seed=s.seed, num_unlabelled=s.num_unlabelled, zoom=s.zoom)
        params = {"num_train": s.num_train, "num_test": s.num_test, "num_unlabelled": s.num_unlabelled,
                  "image_size": s.image_size, "zoom": s.zoom, "seed": s.seed}
    elif ds.source == "deepforest":
        summary, params = copy_deepforest(root), {}
    else:
        raise ValueError(f"datasets.{dataset}.source is {ds.source!r}: only synthetic and deepforest datasets are generated")
    manifest = {"dataset": dataset, "source": ds.source, "params": params, "summary": summary,
                "code_version": code_version()}
    write_json(root / "MANIFEST.json", manifest)
    log.info("demo-data %s (%s) -> %s", dataset, ds.source, root)
    return manifest
