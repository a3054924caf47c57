"""Configuration dataclasses and their validation.

Every option lives in a dataclass with a default; YAML/JSON files are read into
these classes by :func:`from_dict`, which rejects unknown keys and wrong types with
a one-line :class:`ConfigError` that names the key and the allowed values.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range (one-line message)."""


def _check_choice(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{name}: {value!r} is not allowed; use one of {', '.join(map(repr, allowed))}")


def _check_positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{section}.{name}: must be > 0, got {value!r}")


def _check_probability(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{section}.{name}: must be in [0, 1), got {value!r}")


@dataclass
class ModelConfig:
    """Shape and variant of the encoder-decoder Transformer.

    Defaults follow "Attention Is All You Need" (base model, post-norm, interleaved
    sinusoids, embeddings scaled by sqrt(d_model), ReLU). The Marian/OPUS-MT variants
    are options: ``sinusoid_layout="halves"``, ``activation="swish"``, ``output_bias``
    (Marian's final logits bias) and ``decoder_start_id`` (Marian starts from <pad>).
    """

    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512
    heads: int = 8
    ff: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation: str = "relu"
    max_len: int = 1024
    norm: str = "post"
    final_norm: bool | None = None  # None: True for pre-norm (needed there), False for post-norm
    layer_norm_eps: float = 1e-5
    positional: str = "sinusoidal"
    sinusoid_layout: str = "interleaved"
    scale_embeddings: bool = True
    share_embeddings: bool = False
    tie_output: bool = False
    output_bias: bool = False
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    decoder_start_id: int | None = None  # None: start decoding from bos_id

    ACTIVATIONS = ("relu", "gelu", "swish")
    NORMS = ("post", "pre")
    POSITIONALS = ("sinusoidal", "learned")
    LAYOUTS = ("interleaved", "halves")

    def __post_init__(self) -> None:
        s = "model"
        _check_positive(s, self, "src_vocab_size", "tgt_vocab_size", "d_model", "heads", "ff",
                        "encoder_layers", "decoder_layers", "max_len", "layer_norm_eps")
        _check_probability(s, self, "dropout", "attention_dropout", "activation_dropout")
        _check_choice(s, "activation", self.activation, self.ACTIVATIONS)
        _check_choice(s, "norm", self.norm, self.NORMS)
        _check_choice(s, "positional", self.positional, self.POSITIONALS)
        _check_choice(s, "sinusoid_layout", self.sinusoid_layout, self.LAYOUTS)
        if self.d_model % self.heads:
            raise ConfigError(f"model.heads: d_model={self.d_model} is not divisible by heads={self.heads}")
        if self.d_model % 2:
            raise ConfigError(f"model.d_model: must be even for sinusoidal positions, got {self.d_model}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ConfigError("model.share_embeddings: source and target vocabularies differ in size "
                              f"({self.src_vocab_size} vs {self.tgt_vocab_size}); use a shared vocabulary or set it false")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.tgt_vocab_size:
                raise ConfigError(f"model.{name}: {getattr(self, name)} is outside the target vocabulary")
        if self.final_norm is None:
            self.final_norm = self.norm == "pre"
        if self.decoder_start_id is None:
            self.decoder_start_id = self.bos_id

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(section: str, name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a simple type hint (int, float, bool, str, X | None, dataclass)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{section}.{name}: expected a mapping, got {type(value).__name__}")
        return from_dict(hint, value, section=f"{section}.{name}")
    if typing.get_origin(hint) in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{section}.{name}: expected a list, got {value!r}")
        return list(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{section}.{name}: expected true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{section}.{name}: expected an integer, got {value!r}")
    if hint in (float, str) and not isinstance(value, hint):
        raise ConfigError(f"{section}.{name}: expected a {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], section: str | None = None):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    section = section or cls.__name__.removesuffix("Config").lower()
    if not isinstance(data, dict):
        raise ConfigError(f"{section}: expected a mapping of options, got {type(data).__name__}")
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{section}.{unknown[0]}: unknown option; allowed options are {', '.join(names)}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{section}.{missing[0]}: required option is missing")
    values = {k: _coerce(section, k, v, hints[k]) for k, v in data.items()}
    return cls(**values)


def to_dict(obj: Any) -> dict[str, Any]:
    """The inverse of :func:`from_dict` (plain, JSON/YAML-serialisable values)."""
    return dataclasses.asdict(obj)


__all__ = ["ConfigError", "ModelConfig", "from_dict", "to_dict"]
