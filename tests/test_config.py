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
    assert syn.tiling.size == 256 and syn.tiling.img_rate_threshold == 0.6  # explicit and default
    assert syn.synthetic.zoom == 2 and syn.synthetic.num_unlabelled == 16
    pool = syn.split("unlabelled")  # unlabelled: its label folder is never written
    assert pool.images == Path("results/data/synthetic/unlabelled/images") and pool.list.name == "unlabelled.txt"
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


def test_loss_defaults_are_the_libraries_defaults():
    """The schema lists every loss key with the value the library would use (no drift between them)."""
    import inspect

    from mutdet.losses import build_criterion
    from mutdet.losses.pretrain import PretrainCriterion

    cfg = from_dict({})
    library = {name: p.default for name, p in inspect.signature(build_criterion).parameters.items()
               if name.startswith(("loss_", "cost_", "focal_"))}
    assert dict(cfg.finetune.loss) == library
    alignment = {name: p.default for name, p in inspect.signature(PretrainCriterion.__init__).parameters.items()
                 if name not in ("self", "detection", "variant")}
    assert dict(cfg.pretrain.loss) == {**library, **alignment}


def test_pretrain_loss_settings_reach_their_criterion():
    from mutdet.losses.pretrain import build_pretrain_criterion

    cfg = from_dict({"pretrain": {"loss": {"temperature": 0.5, "align_weight": 3.0, "loss_giou": 4.0}}})
    criterion = build_pretrain_criterion(variant=cfg.variant("mutdet"), num_classes=4, num_decoder_layers=2,
                                         **cfg.pretrain.loss)
    assert criterion.temperature == 0.5 and criterion.weight_dict["loss_align"] == 3.0
    assert criterion.weight_dict["loss_giou"] == 4.0 and criterion.weight_dict["loss_giou_0"] == 4.0


def test_cross_section_checks(tmp_path):
    with pytest.raises(ConfigError, match=r"cluster.pca_dim \(64\) must equal finetune.model.embed_dim \(256\)"):
        from_dict({"cluster": {"pca_dim": 64}, "proposals": {"datasets": ["d/train"]},
                   "datasets": {"d": {"root": str(tmp_path), "format": "dota", "classes": ["a"], "splits": {"train": {}}}}})
    with pytest.raises(ConfigError, match=r"cluster.pca_dim \(1024\) exceeds the dimension of embedding.backbone resnet18"):
        from_dict({"cluster": {"pca_dim": 1024}, "finetune": {"model": {"embed_dim": 1024}},
                   "embedding": {"backbone": "resnet18"}, "proposals": {"datasets": ["d/train"]},
                   "datasets": {"d": {"root": str(tmp_path), "format": "dota", "classes": ["a"], "splits": {"train": {}}}}})
    with pytest.raises(ConfigError, match=r"tables.compare.dior: names no dataset"):
        from_dict({"tables": {"compare": {"dior": "DIOR-R"}}})
    with pytest.raises(ConfigError, match="finetune.loss: Additional properties are not allowed"):
        from_dict({"finetune": {"loss": {"loss_gio": 1.0}}})
    with pytest.raises(ConfigError, match="pretrain.align_weight: moved to pretrain.loss.align_weight"):
        from_dict({"pretrain": {"align_weight": 1.0}})
    # without pre-training nothing ties pca_dim to the detector
    assert from_dict({"cluster": {"pca_dim": 64}}).cluster.pca_dim == 64


def test_sections_change_only_with_what_a_job_depends_on():
    base = from_dict({})
    assert base.sections_digest("cluster") == from_dict({"tables": {"num_tiles": 9}}).sections_digest("cluster")
    assert base.sections_digest("cluster") != from_dict({"cluster": {"k": 9}}).sections_digest("cluster")
    assert base.sections_digest("cluster") != from_dict({"seed": 1}).sections_digest("cluster")
    more = from_dict({"pretrain": {"variants": {"detreg": {}, "mutdet": {}, "other": {"base": "mutdet"}}}})
    assert base.sections_digest("pretrain", variant="mutdet") == more.sections_digest("pretrain", variant="mutdet")
    assert base.digest() != more.digest()
    with pytest.raises(ConfigError, match="unknown stage 'tiles'"):
        base.sections("tiles")


@pytest.mark.parametrize("name", ["config.yaml", "config/paper/dior-r.yaml", "config/paper/dota.yaml",
                                  "config/paper/ohd-sjtu.yaml", "config/experiments/low-data.yaml",
                                  "config/experiments/ablation.yaml"])
def test_ablation_ladders_change_one_flag_per_row(name):
    """Each row of an ablation table pre-trains with exactly one flag changed from the row above, from
    DETReg to MutDet, and the paper's rows are among them (matched by flags)."""
    from dataclasses import asdict

    from mutdet import paper

    cfg = load_config(REPO / name)
    ladder = [{k: v for k, v in asdict(cfg.variant(init)).items() if k != "name"} for init in cfg.tables["ablation"]]
    if not ladder:
        return
    assert ladder[0] == paper.ABLATION_FLAGS[0] and ladder[-1] == paper.ABLATION_FLAGS[-1]
    for above, row in zip(ladder, ladder[1:]):
        assert sum(above[k] != row[k] for k in row) == 1, (above, row)
    assert [paper.ablation_row(flags) for flags in ladder if paper.ablation_row(flags) is not None] == [0, 1, 2, 3, 4]
    runs = {(i, e) for r in cfg.finetune.runs for i in r.inits for e in r.epochs if 1.0 in r.fractions}
    assert all(any((init, e) in runs for e in r.epochs) for init in cfg.tables["ablation"] for r in cfg.finetune.runs)


def test_demo_schedule_experiment_overlays_the_demo():
    """`--configfile config.yaml config/experiments/demo-schedule.yaml` (Snakemake updates the first with
    the second, nested keys included): the demo with its runs replaced by `none` at 100 % for 10 and 20
    epochs, seeds 0 and 1, in its own results folder, and no pre-training to run."""
    from snakemake.utils import update_config

    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    update_config(raw, yaml.safe_load((REPO / "config" / "experiments" / "demo-schedule.yaml").read_text()))
    cfg = from_dict(raw)
    demo = load_config(REPO / "config.yaml")
    runs = [(r.inits, r.fractions, r.epochs, r.seeds) for r in cfg.finetune.runs]
    assert runs == [(("none",), (1.0,), (10, 20), (0, 1))]
    assert str(cfg.results) == "results-demo-schedule" and not cfg.pretraining_needed()
    assert cfg.finetune.model == demo.finetune.model and cfg.finetune.train == demo.finetune.train
    assert cfg.datasets == demo.datasets


def test_stages_read_only_the_sections_their_rerun_trigger_covers():
    """A stage gets the whole config, but a rule reruns only when its `job_sections` part changes: a stage
    reading a section outside that part would silently keep stale outputs. Every `cfg.<section>` a stage
    module reads must be a top-level key of its part."""
    import ast

    attribute_section = {"dataset": "datasets", "variant": "pretrain", "datasets": "datasets"}
    cfg = from_dict({"datasets": {"d": {"root": "r", "format": "dota", "classes": ["a"], "splits": {"s": {}}}}})
    for path in sorted((REPO / "mutdet" / "stages").glob("*.py")):
        stage = path.stem
        if stage in ("outputs", "common", "parts", "detect", "merge", "loss_curves", "__init__"):
            continue  # no config (detect, merge, loss-curves) or not a stage (`mutdet outputs` only lists)
        part = set(cfg.sections(stage, dataset="d", variant="mutdet"))
        read = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cfg":
                if node.attr == "raw":
                    continue
                read.add(attribute_section.get(node.attr, node.attr))
            if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "raw"
                    and isinstance(node.slice, ast.Constant)):
                read.add(node.slice.value)
        assert read, f"{stage}: reads no config at all?"
        assert read <= part, f"stage {stage} reads {sorted(read - part)} outside its rerun trigger {sorted(part)}"


def test_a_number_yaml_reads_as_text_gets_a_hint(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  train: {lr: 1e-4}\n")  # YAML 1.1: no dot, so a string
    with pytest.raises(ConfigError, match=r"finetune.train.lr: '1e-4' is not of type 'number' \(YAML reads 1e-4 as "
                                          r"text; write it with a dot, e.g. 1.0e-4\)"):
        load_config(path)


def _sweep(tmp_path, **run) -> dict:
    """A config with one dataset and one fine-tuning run entry (``run`` overrides)."""
    return {"seed": 42, "results": str(tmp_path / "results"),
            "datasets": {"d": {"root": str(tmp_path), "format": "dota", "classes": ["a"],
                               "splits": {"train": {}, "test": {}}}},
            "finetune": {"runs": [{"dataset": "d", "fractions": [0.5, 1.0], "epochs": [3], **run}]}}


def test_finetune_seeds_default_to_the_top_level_seed_and_are_checked(tmp_path):
    assert from_dict(_sweep(tmp_path)).finetune.runs[0].seeds == (42,)
    assert from_dict({**_sweep(tmp_path), "seed": 7}).finetune.runs[0].seeds == (7,)
    assert from_dict(_sweep(tmp_path, seeds=[3, 1, 2])).finetune.runs[0].seeds == (3, 1, 2)
    for seeds, message in (([1, "two"], r"finetune\.runs\.0\.seeds\.1: 'two' is not of type 'integer'"),
                           ([1, 1.5], r"finetune\.runs\.0\.seeds\.1: 1\.5 is not of type 'integer'"),
                           ([-1], r"finetune\.runs\.0\.seeds\.0: -1 is less than the minimum of 0"),
                           ([1, 1], r"finetune\.runs\.0\.seeds: \[1, 1\] has non-unique elements"),
                           ([], r"finetune\.runs\.0\.seeds: \[\] should be non-empty"),
                           (4, r"finetune\.runs\.0\.seeds: 4 is not of type 'array', 'null'"),
                           ([True], r"finetune\.runs\.0\.seeds\.0: True is not of type 'integer'")):
        with pytest.raises(ConfigError, match=message):
            from_dict(_sweep(tmp_path, seeds=seeds))


def test_every_seed_is_its_own_job_and_folder(tmp_path):
    from mutdet.layout import FinetuneJob, Layout

    raw = _sweep(tmp_path, inits=["none"], seeds=[42, 7])
    raw["finetune"]["runs"].append({"dataset": "d", "fractions": [1.0], "epochs": [3], "seeds": [7, 9]})
    layout = Layout(from_dict(raw))
    jobs = layout.finetune_jobs()
    # the union of the entries: (1.0, 3, 7) is in both and runs once
    assert [(j.fraction, j.seed) for j in jobs] == [(0.5, 42), (0.5, 7), (1.0, 42), (1.0, 7), (1.0, 9)]
    assert jobs[0] == FinetuneJob("d", "train", "test", "none", 0.5, 3, 42)
    assert layout.job_dir(jobs[1]) == tmp_path / "results/finetune/init~none/frac~0.5/epochs~3/seed~7/d/test"
    assert len({layout.job_dir(j) for j in jobs}) == len(jobs)
    assert str(layout.finetune_dir("{init}", "{fraction}", "{epochs}", "{seed}", "{dataset}", "{split}")).endswith(
        "finetune/init~{init}/frac~{fraction}/epochs~{epochs}/seed~{seed}/{dataset}/{split}")
    # every seed of a cell trains on the one fraction list, drawn with the top-level seed (not in its name)
    assert layout.fractions_file("d", "train", 0.5) == tmp_path / "results/d/fractions/train/frac~0.5.txt"


def test_adding_a_seed_leaves_the_existing_jobs_rerun_triggers_alone(tmp_path):
    one, two = from_dict(_sweep(tmp_path)), from_dict(_sweep(tmp_path, seeds=[42, 5]))
    for stage in ("finetune", "merge", "evaluate", "subset"):
        assert one.sections_digest(stage, dataset="d") == two.sections_digest(stage, dataset="d"), stage
    assert one.sections_digest("tables") != two.sections_digest("tables")  # the tables gain the seed
