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
from pathlib import Path
from typing import Any

import yaml


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


def _check_not_negative(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 0:
            raise ConfigError(f"{section}.{name}: must be >= 0, got {value!r}")


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


@dataclass
class TokenizerConfig:
    """How to build a tokenizer: ``kind`` is sentencepiece (subwords), char or symbol (whitespace-separated)."""

    kind: str = "sentencepiece"
    vocab_size: int = 8000
    model_type: str = "unigram"
    character_coverage: float = 1.0
    min_count: int = 1
    case: str = "keep"  # char/symbol: fold every text to "upper" or "lower" case first

    def __post_init__(self) -> None:
        _check_choice("data.tokenizer", "kind", self.kind, ("sentencepiece", "char", "symbol"))
        _check_choice("data.tokenizer", "model_type", self.model_type, ("unigram", "bpe"))
        _check_choice("data.tokenizer", "case", self.case, ("keep", "upper", "lower"))
        if self.case != "keep" and self.kind == "sentencepiece":
            raise ConfigError("data.tokenizer.case: applies to char and symbol tokenizers only "
                              "(sentencepiece keeps the case it was trained on)")
        _check_positive("data.tokenizer", self, "vocab_size", "min_count")


@dataclass
class DataConfig:
    """Where the parallel text is and how it becomes token ids.

    ``train``/``dev`` are either a TSV file (two columns) or a pair of files
    ``[source, target]`` with one segment per line.
    """

    train: list | str = ""
    dev: list | str = ""
    src_tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    tgt_tokenizer: TokenizerConfig | None = None  # None: same settings as the source
    shared_vocab: bool = False  # one tokenizer trained on both sides (needed to share embeddings)
    max_len: int = 256  # longer training pairs are dropped (and counted)

    def __post_init__(self) -> None:
        for name in ("train", "dev"):
            value = getattr(self, name)
            if not value:
                raise ConfigError(f"data.{name}: required; give a TSV path or [source_file, target_file]")
            if isinstance(value, list) and len(value) != 2:
                raise ConfigError(f"data.{name}: expected a TSV path or [source_file, target_file], got {value!r}")
        _check_positive("data", self, "max_len")


@dataclass
class TrainConfig:
    """The optimisation: Adam with warmup and a decay schedule, label smoothing, clipping.

    ``schedule``: ``inverse_sqrt`` (the paper's) decays as 1/sqrt(step) forever; ``cosine`` and
    ``linear`` decay to zero at the end of the budget, the first of ``max_steps`` and
    ``max_minutes`` (of training time, checkpointed, so a resumed run continues the same curve).
    A run cut short by a time budget ends annealed instead of mid-way at a high learning rate.
    """

    max_tokens: int = 4096  # per batch, padding included, summed over ranks
    accumulate: int = 1  # batches per optimizer step
    lr: float = 7e-4  # peak learning rate, reached after `warmup` steps
    warmup: int = 4000
    schedule: str = "inverse_sqrt"
    betas: list = dataclasses.field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-9
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    clip_norm: float = 1.0  # 0 turns clipping off
    max_steps: int = 100000
    max_epochs: int = 0  # 0: no limit
    max_minutes: float = 0.0  # 0: no wall-clock limit
    seed: int = 1
    validate_every: int = 1000
    metric: str = "bleu"
    patience: int = 0  # stop after this many validations without improvement; 0: never
    keep_checkpoints: int = 5  # step checkpoints kept for averaging
    beam: int = 1  # beam size for validation decoding
    log_every: int = 50
    device: str = "auto"
    threads: int = 0  # torch threads on CPU; 0: all cores
    precision: str = "fp32"  # bf16: autocast; auto: bf16 where the hardware has it (AMX/AVX512-BF16 CPUs, Ampere+ GPUs)

    METRICS = ("bleu", "chrf", "wer", "per", "exact", "loss")
    SCHEDULES = ("inverse_sqrt", "cosine", "linear")

    def __post_init__(self) -> None:
        _check_positive("train", self, "max_tokens", "accumulate", "lr", "max_steps", "validate_every", "log_every",
                        "beam", "keep_checkpoints")
        _check_choice("train", "metric", self.metric, self.METRICS)
        _check_choice("train", "precision", self.precision, ("fp32", "bf16", "auto"))
        _check_choice("train", "schedule", self.schedule, self.SCHEDULES)
        _check_positive("train", self, "eps")
        _check_not_negative("train", self, "warmup", "weight_decay", "clip_norm", "max_epochs", "max_minutes",
                            "patience", "threads")
        _check_probability("train", self, "label_smoothing")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas: expected two numbers in [0, 1) like [0.9, 0.98], got {self.betas!r}")

    @property
    def higher_is_better(self) -> bool:
        return self.metric in ("bleu", "chrf", "exact")


@dataclass
class RunConfig:
    """One training run: the data, the model shape (vocabulary sizes come from the tokenizers), the training."""

    data: DataConfig
    model: dict = dataclasses.field(default_factory=dict)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # Validate the model section now (with stand-in vocabulary sizes) so typos fail before any work.
        self.model_config(100, 100)

    def model_config(self, src_vocab_size: int, tgt_vocab_size: int) -> ModelConfig:
        if "src_vocab_size" in self.model or "tgt_vocab_size" in self.model:
            raise ConfigError("model.src_vocab_size: set by the tokenizers; remove it from the config")
        return from_dict(ModelConfig, {**self.model, "src_vocab_size": src_vocab_size,
                                       "tgt_vocab_size": tgt_vocab_size}, section="model")


# What may change when a run folder is trained again: budgets, bookkeeping and the machine.
# Anything else (data, tokenizers, model, optimiser) would silently mix two runs' settings.
RESUMABLE_CHANGES = {f"train.{name}" for name in ("max_steps", "max_epochs", "max_minutes", "patience",
                                                   "validate_every", "log_every", "keep_checkpoints", "beam",
                                                   "device", "threads")}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Options that differ between two run configs, defaults filled in: ``{"model.dropout": (0.1, 0.2)}``."""
    def flat(cfg: RunConfig) -> dict[str, Any]:
        model = {k: v for k, v in to_dict(cfg.model_config(100, 100)).items() if not k.endswith("vocab_size")}
        return _flatten({"data": to_dict(cfg.data), "model": model, "train": to_dict(cfg.train)})
    a, b = flat(old), flat(new)
    return {key: (a.get(key), b.get(key)) for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)}


def check_resumable(cfg: RunConfig, saved: Path) -> dict[str, tuple[Any, Any]]:
    """Check that ``cfg`` may continue the run whose config was saved at ``saved`` (if any).

    A run folder's tokenizers, binarized data and checkpoints are reused, so training it again
    under other data, model or optimiser settings would mix two runs without a word: refuse with a
    :class:`ConfigError`. Returns the allowed changes (budgets, threads, ...), to be logged.
    """
    if not saved.exists():
        return {}
    try:
        old = from_dict(RunConfig, yaml.safe_load(saved.read_text(encoding="utf-8")) or {})
    except (ConfigError, yaml.YAMLError) as e:
        raise ConfigError(f"{saved}: cannot read the earlier run's config ({str(e).splitlines()[0]}); "
                          "train into a new --run folder") from None
    changes = config_changes(old, cfg)
    fixed = [f"{key}: {a!r} -> {b!r}" for key, (a, b) in changes.items() if key not in RESUMABLE_CHANGES]
    if fixed:
        more = f" and {len(fixed) - 3} more" if len(fixed) > 3 else ""
        raise ConfigError(f"{saved.parent} holds a run with other settings ({'; '.join(fixed[:3])}{more}); "
                          f"give a new --run folder, or delete {saved.parent} to start afresh")
    return changes


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config, apply ``key.sub=value`` overrides (values parsed as YAML), validate."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=0.001")
        *parents, leaf = key.strip().split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(value)
    return from_dict(RunConfig, data)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a simple type hint (int, float, bool, str, list, dict, dataclass, unions)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(name, value, option)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of options, got {value!r}")
        return from_dict(hint, value, section=name)
    expected = {list: (list, tuple), dict: (dict,), str: (str,), bool: (bool,)}.get(hint)
    if expected and not isinstance(value, expected):
        raise ConfigError(f"{name}: expected a {hint.__name__}, got {value!r}")
    if hint in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if hint is int and not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if hint is float:
        return float(value)
    return list(value) if hint is list else value


def from_dict(cls: type, data: dict[str, Any], section: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    ``section`` prefixes the key names in error messages (e.g. ``train``).
    """
    prefix = f"{section}." if section else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{section or 'config'}: expected a mapping of options, got {data!r}")
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown option; allowed: {', '.join(names)}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: required option is missing")
    return cls(**{k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()})


def to_dict(obj: Any) -> dict[str, Any]:
    """The inverse of :func:`from_dict` (plain, JSON/YAML-serialisable values)."""
    return dataclasses.asdict(obj)


__all__ = ["RESUMABLE_CHANGES", "ConfigError", "DataConfig", "ModelConfig", "RunConfig", "TokenizerConfig",
           "TrainConfig", "check_resumable", "config_changes", "from_dict", "load_config", "to_dict"]
