import json
from pathlib import Path

import pytest
import yaml

from mutdet.config import ConfigError, from_dict, load_config, validate_config

from conftest import REPO


def test_default_config_loads_with_every_default_filled():
    cfg = load_config(REPO / "config.yaml")
    assert set(cfg.datasets) == {"synthetic", "trees"}
    syn = cfg.dataset("synthetic")
    assert syn.tiling.size == 512 and syn.tiling.img_rate_threshold == 0.6  # explicit and default
    assert syn.split("train").images == Path("results/data/synthetic/images")
    assert syn.split("train").list == Path("results/data/synthetic/train.txt")
    trees = cfg.dataset("trees")
    assert trees.class_aliases == {"dead": "tree", "alive": "tree"}
    with pytest.raises(Exception):
        syn.shards = 3  # frozen


def test_every_schema_key_has_description_and_default():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())

    def walk(props, path, required=()):
        for name, sub in props.items():
            assert "description" in sub, f"{path}{name} has no description"
            assert "default" in sub or name in required, f"{path}{name} has no default"
            if "properties" in sub:
                walk(sub["properties"], f"{path}{name}.", sub.get("required", ()))
            extra = sub.get("additionalProperties")
            if isinstance(extra, dict) and "properties" in extra:
                walk(extra["properties"], f"{path}{name}.*.", extra.get("required", ()))

    walk(schema["properties"], "")
    ds = schema["definitions"]["dataset"]
    walk(ds["properties"], "datasets.*.", ds["required"])


def test_unknown_key_is_named():
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["datasets"]["synthetic"]["tiling"]["tile_szie"] = 3
    with pytest.raises(ConfigError, match=r"datasets\.synthetic\.tiling: .*'tile_szie' was unexpected"):
        validate_config(raw, "config.yaml")


def test_wrong_type_is_named():
    raw = {"datasets": {"x": {"root": "r", "format": "dota", "classes": ["a"], "shards": "two"}}}
    with pytest.raises(ConfigError, match=r"datasets\.x\.shards: 'two' is not of type 'integer'"):
        from_dict(raw)
    with pytest.raises(ConfigError, match=r"datasets\.x\.format: 'coco' is not one of"):
        from_dict({"datasets": {"x": {"root": "r", "format": "coco", "classes": ["a"]}}})


def test_semantic_errors():
    with pytest.raises(ConfigError, match="gap"):
        from_dict({"datasets": {"x": {"root": "r", "format": "dota", "classes": ["a"], "tiling": {"size": 100, "gap": 100}}}})
    with pytest.raises(ConfigError, match=r"class_aliases\.Foo"):
        from_dict({"datasets": {"x": {"root": "r", "format": "voc", "classes": ["a"], "class_aliases": {"Foo": "b"}}}})
    with pytest.raises(ConfigError, match="no dataset named 'y'"):
        from_dict({}).dataset("y")


def test_inline_json_and_file_errors(tmp_path):
    cfg = load_config(json.dumps({"seed": 7}))
    assert cfg.seed == 7 and cfg.results == Path("results")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


@pytest.mark.parametrize("name", ["dior-r", "dota", "ohd-sjtu"])
def test_paper_configs_validate_and_follow_the_protocol(name):
    cfg = load_config(REPO / "config" / "paper" / f"{name}.yaml")
    assert cfg.proposals.method == "sam" and cfg.proposals.sam.model_type == "vit_h"
    assert (cfg.embedding.backbone, cfg.embedding.weights) == ("resnet50", "imagenet")
    assert (cfg.cluster.pca_dim, cfg.cluster.k) == (256, 256) and cfg.finetune.model["backbone"] == "resnet50"
    assert {"none", "detreg", "mutdet"} <= {i for r in cfg.finetune.runs for i in r.inits}
    assert cfg.dataset("dota").tiling.size == 800 and cfg.dataset("dota").tiling.gap == 200


def test_pretrained_init_needs_pretraining_data():
    raw = yaml.safe_load((REPO / ".test" / "config.yaml").read_text())
    raw["proposals"]["datasets"] = []
    with pytest.raises(ConfigError, match=r"finetune.runs: inits \['detreg', 'mutdet'\] need pre-training"):
        from_dict(raw)
    raw["finetune"]["runs"][0]["inits"] = ["none", "mutdett"]
    raw["proposals"]["datasets"] = ["tiny/train"]
    with pytest.raises(ConfigError, match="'mutdett' is neither `none` nor a pretrain.variants name"):
        from_dict(raw)
