"""Pre-training variants: which parts of MutDet are on (see :mod:`mutdet.models.pretrain` for what
each flag does). Torch-free, so the config can validate variants without loading torch."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["PretrainVariant", "PRESETS", "variant_from_dict"]

_CHOICES = {
    "classes": ("pseudo", "agnostic"),
    "alignment": ("contrastive", "l1"),
    "target": ("enhanced", "raw"),
    "decoder_features": ("enhanced", "plain"),
    "proposal_selection": ("similarity", "objectness"),
}


@dataclass(frozen=True)
class PretrainVariant:
    """Which parts of MutDet are on (module docstring). Build with :func:`variant_from_dict`."""

    name: str
    classes: str
    alignment: str
    target: str
    decoder_features: str
    encoder_embedding_loss: bool
    siamese: bool
    proposal_selection: str

    @property
    def uses_enhancement(self) -> bool:
        return self.target == "enhanced" or self.decoder_features == "enhanced"

    def validate(self) -> "PretrainVariant":
        where = f"pretrain.variants.{self.name}"
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{where}.{key}: {getattr(self, key)!r} is not one of {list(allowed)}")
        if self.siamese and self.decoder_features != "enhanced":
            raise ValueError(f"{where}: siamese: true needs decoder_features: enhanced (the siamese pass is the "
                             f"decoder on the plain features, which the main pass already is)")
        if self.proposal_selection == "similarity" and not (self.encoder_embedding_loss
                                                            and self.decoder_features == "enhanced"):
            raise ValueError(f"{where}: proposal_selection: similarity needs encoder_embedding_loss: true (a trained "
                             f"Z_enc) and decoder_features: enhanced")
        return self


PRESETS: dict[str, dict] = {
    "detreg": {"classes": "agnostic", "alignment": "l1", "target": "raw", "decoder_features": "plain",
               "encoder_embedding_loss": False, "siamese": False, "proposal_selection": "objectness"},
    "mutdet": {"classes": "pseudo", "alignment": "contrastive", "target": "enhanced", "decoder_features": "enhanced",
               "encoder_embedding_loss": True, "siamese": True, "proposal_selection": "similarity"},
}


def variant_from_dict(name: str, values: Mapping | None = None) -> PretrainVariant:
    """A variant from a config entry: ``base`` (a :data:`PRESETS` name; default: ``name`` if it is one)
    plus any flag overriding it."""
    values = {k: v for k, v in dict(values or {}).items() if v is not None}  # null: keep the preset's value
    base = values.pop("base", name if name in PRESETS else None)
    if base not in PRESETS:
        raise ValueError(f"pretrain.variants.{name}.base: {base!r} is not one of {sorted(PRESETS)}")
    unknown = sorted(set(values) - set(PRESETS[base]))
    if unknown:
        raise ValueError(f"pretrain.variants.{name}: unknown flag(s) {unknown}; known: {sorted(PRESETS[base])}")
    return PretrainVariant(name=name, **{**PRESETS[base], **values}).validate()
