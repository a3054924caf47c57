"""Model folders and training checkpoints: safetensors for tensors, JSON for the rest.

A *model folder* holds everything needed to translate::

    model.safetensors   weights (float32; or float16, or int8 matrices with per-row scales, see
                        :func:`save_model_folder`; loading always gives float32)
    config.json         {"model": ModelConfig, "src_tokenizer": file, "tgt_tokenizer": file}
    src.tokenizer, tgt.tokenizer

A *checkpoint* is a model folder plus the trainer's state (``trainer.safetensors``
for optimizer moments and RNG state, ``trainer.json`` for step, data position and
the rest), so training resumes exactly. Folders are written under a temporary
name and renamed into place: a crash never leaves a half-written checkpoint.
Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig, from_dict, to_dict
from .inference import quantize_rows
from .model import Transformer, build_model
from .tokenizer import Tokenizer, default_file_mode, load_tokenizer

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
WEIGHT_FORMATS = ("float32", "float16", "int8")
INT8_SCALE = ":int8_scale"  # key suffix of an int8-stored matrix's per-row float32 scales
TRAINER_TENSORS, TRAINER_JSON = "trainer.safetensors", "trainer.json"


class CheckpointError(ValueError):
    """A model folder or checkpoint is missing, incomplete or corrupt (one-line message)."""


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``final`` in (nearly) one rename.

    The old folder is moved aside before the new one moves in and removed after,
    so at every instant a complete folder exists under ``final`` or ``final.old``
    (which :func:`resolve_folder` falls back to).
    """
    final = Path(final)
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    mode = default_file_mode()
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(f, mode)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def resolve_folder(path: str | Path) -> Path:
    """``path``, or the ``.old`` copy left if a crash hit between the two renames of :func:`atomic_folder`."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    return old if not path.exists() and old.exists() else path


def save_model_folder(folder: Path, model: Transformer, src_tok: Tokenizer, tgt_tok: Tokenizer,
                      extra: dict | None = None, weights: str = "float32") -> None:
    """Write weights, config and tokenizers into ``folder`` (an :func:`atomic_folder`).

    ``weights`` is how ``model.safetensors`` stores them (loading always gives a float32 model):
    ``"float32"``; ``"float16"``, half the size; ``"int8"``, a quarter: every matrix (the Linear
    layers and the embeddings) as int8 with one float32 scale per row (:func:`encdec.inference.quantize_rows`,
    the same rounding as int8 decoding, which therefore sees the same int8 weights), biases and
    layer norms in float32.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights {weights!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    save_file(_compact_state(model, weights), str(folder / MODEL_FILE), metadata={"format": "pt"})
    src_tok.save(folder / "src.tokenizer")
    tgt_tok.save(folder / "tgt.tokenizer")
    config = {"model": to_dict(model.cfg), "src_tokenizer": "src.tokenizer", "tgt_tokenizer": "tgt.tokenizer",
              **(extra or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")


def _compact_state(model: nn.Module, weights: str) -> dict[str, torch.Tensor]:
    """The model's tensors as ``weights`` stores them (float16: floating tensors halved; int8:
    matrices plus ``name + INT8_SCALE`` scales); tied tensors (shared embeddings, tied output
    layer) once, under their first name."""
    state, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        if weights == "float16" and tensor.is_floating_point():
            state[name] = tensor.half().contiguous()
        elif weights == "int8" and tensor.is_floating_point() and tensor.dim() == 2:
            state[name], state[name + INT8_SCALE] = quantize_rows(tensor)
        else:
            state[name] = tensor.contiguous()
    return state


def stored_weights(folder: str | Path) -> str:
    """Which of :data:`WEIGHT_FORMATS` a model folder's ``model.safetensors`` stores."""
    with safe_open(str(resolve_folder(folder) / MODEL_FILE), "pt") as f:
        keys = list(f.keys())
        if any(key.endswith(INT8_SCALE) for key in keys):
            return "int8"
        return "float16" if any(f.get_slice(key).get_dtype() == "F16" for key in keys) else "float32"


def read_config(folder: str | Path) -> dict:
    folder = resolve_folder(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE}; pass a model folder written by 'encdec train' "
                              "(e.g. runs/NAME/best)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e}); restore the folder from a backup or retrain") from None


def load_model_folder(folder: str | Path) -> tuple[Transformer, Tokenizer, Tokenizer, dict]:
    """Model (eval mode), source and target tokenizers, and the config dict of a model folder."""
    folder = resolve_folder(folder)
    config = read_config(folder)
    try:
        model = build_model(from_dict(ModelConfig, config["model"], section="model"))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}/{CONFIG_FILE}: missing or malformed model section ({e})") from None
    load_weights(model, folder / MODEL_FILE)
    src_tok = load_tokenizer(folder / config["src_tokenizer"])
    tgt_tok = load_tokenizer(folder / config["tgt_tokenizer"])
    return model.eval(), src_tok, tgt_tok, config


def load_weights(model: Transformer, path: Path) -> None:
    """Fill ``model`` (float32) from a ``model.safetensors`` in any of :data:`WEIGHT_FORMATS`."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the model folder is incomplete")
    try:
        state = _dequantize(load_file(str(path)), path)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupt or does not match config.json ({str(e).splitlines()[0]})") from None
    # a tied tensor is stored under one of its names; loading that name filled the others
    params = model.state_dict()
    loaded = {params[name].data_ptr() for name in state if name in params}
    missing = [name for name in missing if params[name].data_ptr() not in loaded]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match config.json "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")


def _dequantize(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """int8 matrices times their per-row scales, as float32."""
    out = {}
    for name, tensor in state.items():
        if name.endswith(INT8_SCALE):
            continue
        if tensor.dtype == torch.int8:
            scale = state.get(name + INT8_SCALE)
            if scale is None or tensor.dim() != 2 or scale.shape != (tensor.size(0),):
                raise CheckpointError(f"{path}: corrupt: int8 tensor {name} lacks its {INT8_SCALE} row scales; "
                                      "export the model again")
            tensor = tensor.float() * scale.float()[:, None]
        out[name] = tensor
    return out


def save_trainer_state(folder: Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Optimizer moments and the torch RNG as tensors; everything else (step, data position...) as JSON."""
    opt = optimizer.state_dict()
    tensors = {"rng": torch.get_rng_state()}
    for index, param_state in opt["state"].items():
        for name, value in param_state.items():
            tensors[f"optimizer.{index}.{name}"] = value.contiguous() if torch.is_tensor(value) else torch.tensor(value)
    save_file(tensors, str(folder / TRAINER_TENSORS))
    doc = {**state, "param_groups": opt["param_groups"]}
    (folder / TRAINER_JSON).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def load_trainer_state(folder: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore what :func:`save_trainer_state` wrote; returns the JSON state."""
    folder = resolve_folder(folder)
    try:
        tensors = load_file(str(folder / TRAINER_TENSORS))
        doc = json.loads((folder / TRAINER_JSON).read_text(encoding="utf-8"))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: trainer state is missing or corrupt ({str(e).splitlines()[0]}); "
                              "resume from another checkpoint or start afresh") from None
    opt_state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": doc.pop("param_groups")})
    torch.set_rng_state(tensors["rng"])
    return doc


def average_checkpoints(folders: list[Path], out: Path) -> None:
    """Write a model folder whose weights are the mean of ``folders``' weights (same shape required)."""
    if not folders:
        raise CheckpointError("no checkpoints to average")
    model, src_tok, tgt_tok, config = load_model_folder(folders[0])
    total = {k: v.double().clone() for k, v in model.state_dict().items()}
    for folder in folders[1:]:
        other, *_ = load_model_folder(folder)
        if other.cfg != model.cfg:
            raise CheckpointError(f"{folder}: model shape differs from {folders[0]}; only average one run's checkpoints")
        for k, v in other.state_dict().items():
            total[k] += v.double()
    model.load_state_dict({k: (v / len(folders)).to(model.state_dict()[k].dtype) for k, v in total.items()})
    extra = {k: v for k, v in config.items() if k not in ("model", "src_tokenizer", "tgt_tokenizer")}
    extra["averaged_from"] = [str(f) for f in folders]
    with atomic_folder(out) as tmp:
        save_model_folder(tmp, model, src_tok, tgt_tok, extra)
