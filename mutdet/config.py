"""The pipeline configuration: one YAML file, one JSON schema, frozen dataclasses.

The schema (``workflow/schemas/config.schema.yaml``) is the single source of truth for keys, types,
descriptions and defaults. :func:`validate_config` fills the defaults and raises :class:`ConfigError`
naming every offending key; :func:`from_dict` turns the result into :class:`Config` and makes every
check that spans sections (datasets and variants named elsewhere, ``cluster.pca_dim`` against the
detector and the embedding backbone), so a bad config fails ``snakemake -n``, not a job.

How a value reaches a job: the workflow validates the config once, writes the resolved whole to
``<results>/configs/config-<digest>.json`` (:meth:`mutdet.layout.Layout.config_file`) and every job
reads that file; each stage's ``run(cfg, *, paths)`` is the one place that turns config into library
arguments. A rule's rerun trigger is the digest of the sections its outputs depend on,
:func:`job_sections` below, so changing an unrelated section reruns nothing.

Only the Snakefile, ``mutdet.cli`` and ``mutdet.stages`` read configs; library modules take plain
arguments.
"""
from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A configuration that does not match the schema; the message names the key(s)."""


def params_digest(params: Any) -> str:
    """SHA-1 hex digest of JSON-serialisable parameters (keys sorted): behind folder tags, resume keys
    and the rules' rerun triggers."""
    return hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


# Keys that moved; a config using the old place gets told the new one.
MOVED_KEYS = {("pretrain", "temperature"): "pretrain.loss.temperature",
              ("pretrain", "align_weight"): "pretrain.loss.align_weight"}


# libyaml's loader where PyYAML was built with it (about 10x faster on the schema, read by every
# command); the same safe constructors and resolvers either way.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_schema() -> dict:
    if not SCHEMA_PATH.is_file():
        raise ConfigError(f"config schema not found at {SCHEMA_PATH} (mutdet must run from its source tree)")
    with open(SCHEMA_PATH) as fh:
        return yaml.load(fh, Loader=_YAML_LOADER)


def _default_filling_validator():
    base = jsonschema.Draft7Validator
    validate_properties = base.VALIDATORS["properties"]

    def properties(validator, props, instance, schema):
        if isinstance(instance, dict):
            for name, sub in props.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, props, instance, schema)

    return jsonschema.validators.extend(base, {"properties": properties})


_Validator = _default_filling_validator()


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "<top level>"


def _hint(error: jsonschema.ValidationError) -> str:
    """A number written as YAML 1.1 reads it as text (``1e-4``: no dot) gets told how to write it."""
    if error.validator == "type" and isinstance(error.instance, str):
        try:
            float(error.instance)
        except ValueError:
            return ""
        return f" (YAML reads {error.instance} as text; write it with a dot, e.g. 1.0e-4)"
    return ""


def validate_config(raw: Mapping[str, Any] | None, source: str = "config") -> dict:
    """Validate ``raw`` against the schema and return a copy with every default filled in.

    Raises:
        ConfigError: listing each problem as ``<source>: <key.path>: <message>``.
    """
    instance = copy.deepcopy(dict(raw or {}))
    for (section, key), new in MOVED_KEYS.items():
        if isinstance(instance.get(section), Mapping) and key in instance[section]:
            raise ConfigError(f"invalid configuration\n  {source}: {section}.{key}: moved to {new}")
    validator = _Validator(load_schema())
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"{source}: {_key_path(e)}: {e.message}{_hint(e)}" for e in errors]
        raise ConfigError("invalid configuration\n  " + "\n  ".join(lines))
    return instance


@dataclass(frozen=True)
class TilingConfig:
    enabled: bool
    size: int
    gap: int
    rates: tuple[float, ...]
    iof_threshold: float
    img_rate_threshold: float
    pad_value: tuple[int, int, int]  # RGB
    reference_whole_images: bool = True

    def __post_init__(self):
        if self.enabled and self.gap >= self.size:
            raise ConfigError(f"tiling.gap ({self.gap}) must be smaller than tiling.size ({self.size})")


@dataclass(frozen=True)
class SplitConfig:
    name: str
    images: Path  # folder
    labels: Path  # folder
    list: Path | None  # file of image ids, or None for every image in `images`


@dataclass(frozen=True)
class SyntheticConfig:
    num_train: int
    num_test: int
    image_size: int
    seed: int
    num_unlabelled: int = 0
    zoom: float = 1.0


# The evaluation protocol of a label format when the config names none (the paper's choice per dataset:
# DOTA by the devkit / server, DIOR-R by mmrotate's eval_rbbox_map as ARS-DETR and MutDet report it).
DEFAULT_PROTOCOL = {"dota": "dota_devkit", "dior": "mmrotate", "voc": "mmrotate"}


@dataclass(frozen=True)
class EvaluationConfig:
    protocol: str  # dota_devkit | mmrotate (resolved)
    difficulty_threshold: int  # mmrotate: objects above it are dropped from the ground truth


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    source: str  # files | synthetic | deepforest
    root: Path
    format: str  # dota | dior | voc
    classes: tuple[str, ...]
    class_aliases: Mapping[str, str]  # lower-cased label name -> class name
    image_extensions: tuple[str, ...]
    splits: Mapping[str, SplitConfig]
    shards: int
    tiling: TilingConfig
    synthetic: SyntheticConfig
    evaluation: EvaluationConfig

    def split(self, name: str) -> SplitConfig:
        if name not in self.splits:
            raise ConfigError(f"datasets.{self.name}.splits: no split named {name!r} (have {sorted(self.splits)})")
        return self.splits[name]


@dataclass(frozen=True)
class SamConfig:
    model_type: str  # vit_h | vit_l | vit_b
    checkpoint: Path | None
    device: str  # auto | cpu | cuda | cuda:N
    precision: str  # fp32 | bf16 | fp16
    generator: Mapping[str, Any]  # SamAutomaticMaskGenerator keyword arguments


@dataclass(frozen=True)
class SelectiveSearchConfig:
    mode: str  # fast | quality | single
    resize: int
    max_boxes: int


@dataclass(frozen=True)
class GraphConfig:
    sigma: float
    k: float | list[float]
    min_size: int
    resize: int
    min_area: float
    max_area_fraction: float
    grouping: bool = False
    max_aspect: float | None = None
    nms_iou: float = 1.0
    score: str = "fill"


@dataclass(frozen=True)
class ProposalsConfig:
    datasets: tuple[tuple[str, str], ...]  # (dataset, split) pairs
    method: str  # sam | selective_search | graph
    max_per_tile: int
    on_bad_tile: str  # report | error
    checkpoint_every: int
    sam: SamConfig
    selective_search: SelectiveSearchConfig
    graph: GraphConfig

    def method_params(self) -> dict:
        """The parameters that determine the proposals of the configured method (hashed into paths)."""
        params = {"method": self.method, "max_per_tile": self.max_per_tile}
        if self.method == "sam":
            params.update(model_type=self.sam.model_type, checkpoint=str(self.sam.checkpoint),
                          precision=self.sam.precision, generator=dict(self.sam.generator))
        else:
            params.update(vars(getattr(self, self.method)))
        return params


@dataclass(frozen=True)
class EmbeddingConfig:
    backbone: str
    weights: str  # imagenet | none | path
    batch_size: int
    workers: int
    device: str
    precision: str
    context: float
    input_size: int
    crop_size: int
    checkpoint_every: int
    mode: str  # crop (the paper) | pooled (one backbone pass per tile)


@dataclass(frozen=True)
class ClusterConfig:
    pca_dim: int
    k: int
    max_fit_samples: int
    max_iter: int


def _train_kwargs(train: Mapping[str, Any], epochs: int) -> dict:
    """TrainConfig fields of a run of ``epochs``: lr decay at 8/9 of the schedule unless configured
    (32 of 36, as the paper)."""
    kwargs = dict(train)
    if kwargs.get("lr_decay_epochs") is None:
        kwargs["lr_decay_epochs"] = [round(epochs * 8 / 9)]
    return {**kwargs, "epochs": epochs}


@dataclass(frozen=True)
class FinetuneRun:
    dataset: str
    train_split: str
    test_split: str
    inits: tuple[str, ...]
    fractions: tuple[float, ...]
    epochs: tuple[int, ...]
    seeds: tuple[int, ...]  # fine-tuning seeds; ``runs[].seeds: null`` resolves to ``(seed,)``


@dataclass(frozen=True)
class FinetuneConfig:
    runs: tuple[FinetuneRun, ...]
    input_size: int | None
    flip_probability: float
    device: str
    wandb_mode: str | None
    merge_iou: float
    num_select: int
    score_threshold: float
    eval_batch_size: int
    model: Mapping[str, Any]  # build_detector keywords
    train: Mapping[str, Any]  # TrainConfig fields (without epochs and seed)
    loss: Mapping[str, Any]  # build_criterion keywords

    def train_kwargs(self, epochs: int) -> dict:
        """TrainConfig fields for a run of ``epochs``."""
        return _train_kwargs(self.train, epochs)


@dataclass(frozen=True)
class PretrainConfig:
    variants: Mapping[str, Any]  # name -> mutdet.variants.PretrainVariant
    epochs: int
    input_size: int | None
    max_boxes: int | None
    flip_probability: float
    freeze_backbone: bool
    enhancement: Mapping[str, Any]
    encoder_head_hidden: int
    device: str
    wandb_mode: str | None
    loss_curves: Mapping[str, str | None]
    train: Mapping[str, Any]
    loss: Mapping[str, Any]  # detection loss weights and costs + temperature, align_weight

    def train_kwargs(self) -> dict:
        """TrainConfig fields of the pre-training run."""
        return _train_kwargs(self.train, self.epochs)


@dataclass(frozen=True)
class FractionsConfig:
    datasets: tuple[tuple[str, str], ...]  # (dataset, split) pairs
    values: tuple[float, ...]
    nested: bool


@dataclass(frozen=True)
class Config:
    results: Path
    seed: int
    on_bad_object: str  # error | skip
    datasets: Mapping[str, DatasetConfig]
    proposals: ProposalsConfig
    fractions: FractionsConfig
    embedding: EmbeddingConfig
    cluster: ClusterConfig
    finetune: FinetuneConfig
    pretrain: PretrainConfig
    tables: Mapping[str, Any]
    raw: Mapping[str, Any] = field(repr=False, compare=False)  # the validated mapping, defaults filled in

    def dataset(self, name: str) -> DatasetConfig:
        if name not in self.datasets:
            raise ConfigError(f"datasets: no dataset named {name!r} (have {sorted(self.datasets)})")
        return self.datasets[name]

    def variant(self, name: str):
        """The flags of a ``pretrain.variants`` entry (:class:`mutdet.variants.PretrainVariant`)."""
        if name not in self.pretrain.variants:
            raise ConfigError(f"pretrain.variants: no variant named {name!r} (have {sorted(self.pretrain.variants)})")
        return self.pretrain.variants[name]

    def pretraining_needed(self) -> bool:
        """Whether the run pre-trains anything (a fine-tuning init or the loss-curve figure names a variant)."""
        return bool(self.proposals.datasets) and (
            any(i != "none" for r in self.finetune.runs for i in r.inits)
            or any(v is not None for v in self.pretrain.loss_curves.values()))

    def digest(self) -> str:
        """Digest of the whole resolved config (names the file the jobs read)."""
        return params_digest(self.raw)

    def sections(self, stage: str, *, dataset: str | None = None, variant: str | None = None) -> dict:
        """The parts of the config that outputs of ``stage`` depend on: see :func:`job_sections`."""
        return job_sections(self, stage, dataset=dataset, variant=variant)

    def sections_digest(self, stage: str, *, dataset: str | None = None, variant: str | None = None) -> str:
        """Digest of :meth:`sections`: a rule's rerun trigger (its params change when they change)."""
        return params_digest(self.sections(stage, dataset=dataset, variant=variant))


# `train` settings that change how fast a step runs, not what it computes (beyond float rounding): not
# part of any rule's rerun trigger, as they are not part of the trainer's resume key.
SPEED_ONLY_TRAIN_KEYS = ("compile", "attention_kernel")


def job_sections(cfg: Config, stage: str, *, dataset: str | None = None, variant: str | None = None) -> dict:
    """What the outputs of one job of ``stage`` depend on in the resolved config.

    This table is the contract between a stage and the workflow's rerun triggers: a stage reads only
    keys listed here for it (it receives the whole config, so a key outside its part would be read
    correctly but not rerun it when changed). Sections are chosen so that extending the sweep (a
    fraction, an init, a schedule, a fine-tuning seed, a variant) leaves every existing job's part unchanged: the
    ``finetune`` part leaves out ``finetune.runs`` because a job's init, fraction, schedule and seed are in its
    path (its wildcards), not in the config part. A variant
    enters by its resolved flags, so spelling out a preset's flags changes nothing.
    """
    from dataclasses import asdict

    raw = cfg.raw

    def data(name: str) -> dict:
        return {"on_bad_object": raw["on_bad_object"], "datasets": {name: raw["datasets"][name]}}

    def without(section: str, *keys: str) -> dict:
        part = {k: v for k, v in raw[section].items() if k not in keys}
        if isinstance(part.get("train"), Mapping):  # speed-only settings rerun nothing (as in the resume key)
            part["train"] = {k: v for k, v in part["train"].items() if k not in SPEED_ONLY_TRAIN_KEYS}
        return part

    parts = {
        "demo_data": lambda: {"datasets": {dataset: raw["datasets"][dataset]}},
        "tile": lambda: data(dataset),
        "evaluate": lambda: data(dataset),
        "subset": lambda: {**data(dataset), "seed": raw["seed"], "fractions": {"nested": raw["fractions"]["nested"]}},
        "propose": lambda: {"proposals": without("proposals", "datasets")},
        "embed": lambda: {"embedding": raw["embedding"]},
        "cluster": lambda: {"seed": raw["seed"], "cluster": raw["cluster"]},
        "pretrain": lambda: {"seed": raw["seed"], "finetune": {"model": raw["finetune"]["model"]},
                             "pretrain": {**without("pretrain", "variants", "loss_curves"),
                                          "variant": {k: v for k, v in asdict(cfg.variant(variant)).items()
                                                      if k != "name"}}},
        "loss_curves": lambda: {"loss_curves": raw["pretrain"]["loss_curves"]},
        "finetune": lambda: {"seed": raw["seed"], **data(dataset), "finetune": without("finetune", "runs", "merge_iou")},
        "merge": lambda: {"merge_iou": raw["finetune"]["merge_iou"], "classes": raw["datasets"][dataset]["classes"]},
        "tables": lambda: {"tables": raw["tables"], "finetune": {"runs": raw["finetune"]["runs"]},
                           "datasets": {name: {"classes": d.classes, "protocol": d.evaluation.protocol}
                                        for name, d in cfg.datasets.items()},
                           "pretrain": {"variants": {name: {k: v for k, v in asdict(flags).items() if k != "name"}
                                                     for name, flags in cfg.pretrain.variants.items()}}},
        "config": lambda: dict(raw),
    }
    if stage not in parts:
        raise ConfigError(f"job_sections: unknown stage {stage!r} (have {sorted(parts)})")
    return parts[stage]()


def _dataset(name: str, d: dict) -> DatasetConfig:
    root = Path(d["root"])
    classes = tuple(d["classes"])
    lowered = [c.lower() for c in classes]
    if len(set(lowered)) != len(lowered):
        raise ConfigError(f"datasets.{name}.classes: duplicate class names (case-insensitive): {list(classes)}")
    aliases = {}
    for alias, target in d["class_aliases"].items():
        if target.lower() not in lowered:
            raise ConfigError(f"datasets.{name}.class_aliases.{alias}: {target!r} is not one of classes {list(classes)}")
        aliases[alias.lower()] = classes[lowered.index(target.lower())]
    splits = {}
    for split_name, s in d["splits"].items():
        splits[split_name] = SplitConfig(
            name=split_name,
            images=root / (s["images"] or d["images"]),
            labels=root / (s["labels"] or d["labels"]),
            list=None if s["list"] is None else root / s["list"],
        )
    t = d["tiling"]
    return DatasetConfig(
        name=name,
        source=d["source"],
        root=root,
        format=d["format"],
        classes=classes,
        class_aliases=MappingProxyType(aliases),
        image_extensions=tuple(d["image_extensions"]),
        splits=MappingProxyType(splits),
        shards=d["shards"],
        tiling=TilingConfig(
            enabled=t["enabled"], size=t["size"], gap=t["gap"], rates=tuple(float(r) for r in t["rates"]),
            iof_threshold=float(t["iof_threshold"]), img_rate_threshold=float(t["img_rate_threshold"]),
            pad_value=tuple(t["pad_value"]), reference_whole_images=bool(t["reference_whole_images"]),
        ),
        synthetic=SyntheticConfig(**d["synthetic"]),
        evaluation=EvaluationConfig(protocol=d["evaluation"]["protocol"] or DEFAULT_PROTOCOL[d["format"]],
                                    difficulty_threshold=d["evaluation"]["difficulty_threshold"]),
    )


def _split_refs(refs: list[str], key: str, datasets: Mapping[str, DatasetConfig]) -> tuple[tuple[str, str], ...]:
    """``["dataset/split", ...]`` -> pairs, each checked against the declared datasets and splits."""
    pairs = []
    for ref in refs:
        name, split = ref.split("/")
        if name not in datasets:
            raise ConfigError(f"{key}: {ref!r} names no dataset (have {sorted(datasets)})")
        if split not in datasets[name].splits:
            raise ConfigError(f"{key}: {ref!r}: dataset {name!r} has no split {split!r} (have {sorted(datasets[name].splits)})")
        pairs.append((name, split))
    return tuple(pairs)


def _proposals(p: dict, datasets: Mapping[str, DatasetConfig]) -> ProposalsConfig:
    pairs = _split_refs(p["datasets"], "proposals.datasets", datasets)
    sam = p["sam"]
    return ProposalsConfig(
        datasets=pairs, method=p["method"], max_per_tile=p["max_per_tile"], on_bad_tile=p["on_bad_tile"],
        checkpoint_every=p["checkpoint_every"],
        sam=SamConfig(model_type=sam["model_type"], checkpoint=None if sam["checkpoint"] is None else Path(sam["checkpoint"]),
                      device=sam["device"], precision=sam["precision"], generator=MappingProxyType(dict(sam["generator"]))),
        selective_search=SelectiveSearchConfig(**p["selective_search"]),
        graph=GraphConfig(**p["graph"]),
    )


def _finetune(f: dict, datasets: Mapping[str, DatasetConfig], seed: int) -> FinetuneConfig:
    """The ``finetune`` section; ``seed`` (the top-level one) is the seed of runs that list no ``seeds``."""
    runs = []
    for k, r in enumerate(f["runs"]):
        if r["dataset"] not in datasets:
            raise ConfigError(f"finetune.runs.{k}.dataset: {r['dataset']!r} names no dataset (have {sorted(datasets)})")
        for key in ("train_split", "test_split"):
            if r[key] not in datasets[r["dataset"]].splits:
                raise ConfigError(f"finetune.runs.{k}.{key}: dataset {r['dataset']!r} has no split {r[key]!r}")
        earlier = next((run for run in runs if run.dataset == r["dataset"]), None)
        if earlier is not None and (earlier.train_split, earlier.test_split) != (r["train_split"], r["test_split"]):
            raise ConfigError(f"finetune.runs.{k}: dataset {r['dataset']!r} is fine-tuned on {earlier.train_split!r} and "
                              f"tested on {earlier.test_split!r} by an earlier entry; entries of one dataset (several "
                              f"sweeps whose union is run) must use the same splits")
        runs.append(FinetuneRun(dataset=r["dataset"], train_split=r["train_split"], test_split=r["test_split"],
                                inits=tuple(r["inits"]), fractions=tuple(float(v) for v in r["fractions"]),
                                epochs=tuple(r["epochs"]),
                                seeds=(seed,) if r["seeds"] is None else tuple(r["seeds"])))
    scalars = {k: f[k] for k in ("input_size", "flip_probability", "device", "wandb_mode", "merge_iou",
                                 "num_select", "score_threshold", "eval_batch_size")}
    return FinetuneConfig(runs=tuple(runs), **scalars, model=MappingProxyType(dict(f["model"])),
                          train=MappingProxyType(dict(f["train"])), loss=MappingProxyType(dict(f["loss"])))


def _pretrain(p: dict, finetune: FinetuneConfig, proposals: ProposalsConfig) -> PretrainConfig:
    from mutdet.variants import variant_from_dict

    variants = {}
    for name, flags in p["variants"].items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name) or name == "none":
            raise ConfigError(f"pretrain.variants.{name}: a variant name is letters, digits, '_' and '-', not 'none'")
        try:
            variants[name] = variant_from_dict(name, flags)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    for k, run in enumerate(finetune.runs):
        for init in run.inits:
            if init != "none" and init not in variants:
                raise ConfigError(f"finetune.runs.{k}.inits: {init!r} is neither `none` nor a pretrain.variants name "
                                  f"(have {sorted(variants)})")
    inits = sorted({i for run in finetune.runs for i in run.inits if i != "none"})
    if inits and not proposals.datasets:
        raise ConfigError(f"finetune.runs: inits {inits} need pre-training, which runs on the tiles of "
                          f"proposals.datasets, and that list is empty")
    for key, name in p["loss_curves"].items():
        if name is not None and name not in variants:
            raise ConfigError(f"pretrain.loss_curves.{key}: {name!r} is not a pretrain.variants name "
                              f"(have {sorted(variants)})")
    scalars = {k: p[k] for k in ("epochs", "input_size", "max_boxes", "flip_probability", "freeze_backbone",
                                 "encoder_head_hidden", "device", "wandb_mode")}
    return PretrainConfig(variants=MappingProxyType(variants), **scalars,
                          enhancement=MappingProxyType(dict(p["enhancement"])),
                          loss_curves=MappingProxyType(dict(p["loss_curves"])),
                          train=MappingProxyType(dict(p["train"])), loss=MappingProxyType(dict(p["loss"])))


# Channels of the embedding backbones' C5 (the embeddings' dimension D).
EMBEDDING_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


def _check_across_sections(cfg: Config) -> None:
    """Checks that span sections, made once when the config is read (at DAG time under Snakemake)."""
    for name in cfg.tables["compare"]:
        if name not in cfg.datasets:
            raise ConfigError(f"tables.compare.{name}: names no dataset (have {sorted(cfg.datasets)})")
    if not cfg.pretraining_needed():
        return
    pca_dim, embed_dim = cfg.cluster.pca_dim, cfg.finetune.model["embed_dim"]
    if pca_dim != embed_dim:
        raise ConfigError(f"cluster.pca_dim ({pca_dim}) must equal finetune.model.embed_dim ({embed_dim}): the "
                          f"pre-training targets are aligned with the detector's {embed_dim}-d object embeddings")
    backbone_dim = EMBEDDING_DIMS[cfg.embedding.backbone]
    if pca_dim > backbone_dim:
        raise ConfigError(f"cluster.pca_dim ({pca_dim}) exceeds the dimension of embedding.backbone "
                          f"{cfg.embedding.backbone} ({backbone_dim})")


def from_dict(raw: Mapping[str, Any] | None, source: str = "config") -> Config:
    """Validate a config mapping and build the frozen :class:`Config` (every cross-section check too)."""
    d = validate_config(raw, source)
    datasets = MappingProxyType({name: _dataset(name, ds) for name, ds in d["datasets"].items()})
    finetune = _finetune(d["finetune"], datasets, d["seed"])
    proposals = _proposals(d["proposals"], datasets)
    cfg = Config(
        results=Path(d["results"]),
        seed=d["seed"],
        on_bad_object=d["on_bad_object"],
        datasets=datasets,
        proposals=proposals,
        fractions=FractionsConfig(datasets=_split_refs(d["fractions"]["datasets"], "fractions.datasets", datasets),
                                  values=tuple(float(v) for v in d["fractions"]["values"]),
                                  nested=d["fractions"]["nested"]),
        embedding=EmbeddingConfig(**d["embedding"]),
        cluster=ClusterConfig(**d["cluster"]),
        finetune=finetune,
        pretrain=_pretrain(d["pretrain"], finetune, proposals),
        tables=MappingProxyType(d["tables"]),
        raw=MappingProxyType(d),
    )
    _check_across_sections(cfg)
    return cfg


def load_config(path_or_json: str | Path) -> Config:
    """Load a config from a YAML/JSON file, or from an inline JSON object (text starting with ``{``)."""
    text = str(path_or_json)
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"inline config: invalid JSON: {exc}") from None
        return from_dict(raw, "inline config")
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix == ".json":  # JSON read as YAML 1.1 would turn numbers like 1e-05 into strings
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        return from_dict(raw, str(path))
    return from_dict(read_yaml(path), str(path))


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a mapping; a syntax error names the file, line and column (Snakemake's own
    loader says only that the file is not valid YAML, so the Snakefile reads the default config here
    first)."""
    path = Path(path)
    try:
        with open(path) as fh:
            raw = yaml.load(fh, Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        raise ConfigError(f"{path}:{where} not valid YAML: {exc}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return raw or {}
