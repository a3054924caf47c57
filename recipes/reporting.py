"""What the recipes' reports share: timed decoding at each precision this CPU runs well, and the
line that says how a model was trained (steps, minutes, threads, schedule, precision)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import yaml

from encdec import load
from encdec.plots import read_log
from encdec.train import bf16_is_native


def row_name(precision: str, float_name: str) -> str:
    """A results-table row's name: ``float_name`` for the float32 model, else what decoded it."""
    flag = {"bf16": "--bf16", "int8": "--int8"}.get(precision)
    return float_name if flag is None else f"the same model decoded in {precision} (`{flag}`)"


def decoding_precisions() -> list[str]:
    """float32 and int8 everywhere; bf16 only where the CPU multiplies it natively (AMX, AVX512-BF16)."""
    return ["fp32", "bf16", "int8"] if bf16_is_native(torch.device("cpu")) else ["fp32", "int8"]


def translate(model_dir: Path, sources: list[str], precision: str = "fp32", **search) -> tuple[list[str], float]:
    """The model's outputs for ``sources`` (``search``: beam, alpha, ...) and the seconds decoding took."""
    translator = load(model_dir, precision=precision)
    start = time.perf_counter()
    outputs = translator.translate(sources, **search)
    return outputs, time.perf_counter() - start


def training_summary(run: Path, wall_seconds: float | None = None) -> str:
    """One Markdown bullet: how long and how ``run`` was trained, from its log and saved config."""
    log = read_log(run)
    train = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["train"]
    threads = train.get("threads") or os.cpu_count()
    precision = train.get("precision", "fp32")
    if precision == "auto":  # what train resolved it to: this report runs on the machine that trained
        precision = f"auto: {'bf16' if bf16_is_native(torch.device('cpu')) else 'fp32'} here"
    wall = f"; {wall_seconds / 60:.1f} minutes wall time with data preparation and validations" if wall_seconds else ""
    return (f"- Training: {log[-1]['step']} steps, {log[-1]['elapsed_s'] / 60:.1f} minutes of training steps, "
            f"{threads} CPU thread(s) on this {os.cpu_count()}-core machine, from scratch{wall};\n"
            f"  learning-rate schedule `{train.get('schedule', 'inverse_sqrt')}`, "
            f"precision `{precision}`.")
