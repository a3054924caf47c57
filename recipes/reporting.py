"""What the recipes' reports share: choosing the model to report on the dev set (the kept best or an
average of the last checkpoints), timed decoding at each precision this CPU runs well, and the line
that says how a model was trained (steps, minutes, threads, schedule, precision); the beam search's length
penalty chosen on dev."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import yaml

from encdec import load  # before torch: MKL's AVX512 code on AMD CPUs (encdec/mkl.py)
import torch  # noqa: E402  (after encdec, on purpose)
from encdec.checkpoint import average_checkpoints
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


def select_on_dev(run: Path, dev_score: Callable[[Path], float], higher_is_better: bool,
                  last: tuple[int, ...] = (2, 3, 5)) -> tuple[Path, str]:
    """The model to report: ``run/best`` or the average of the last ``n`` step checkpoints (written
    to ``run/averaged-last-n``), whichever ``dev_score`` (a dev-set metric of a model folder) ranks
    first; never the test set. Returns the folder and a Markdown bullet with every candidate's score.
    """
    checkpoints = sorted((run / "checkpoints").glob("step-*[0-9]"))
    candidates = {"the best validation (`best/`)": run / "best"}
    for n in sorted({min(n, len(checkpoints)) for n in last if len(checkpoints) >= 2}):
        folder = run / f"averaged-last-{n}"
        average_checkpoints(checkpoints[-n:], folder)
        steps = [int(c.name.removeprefix("step-")) for c in checkpoints[-n:]]
        candidates[f"the average of the last {n} checkpoints (steps {steps[0]}-{steps[-1]})"] = folder
    scores = {name: dev_score(folder) for name, folder in candidates.items()}
    chosen = (max if higher_is_better else min)(scores, key=scores.get)  # ties: the first, best/
    listed = "; ".join(f"{name} {score:.2f}" for name, score in scores.items())
    return candidates[chosen], f"- Model, chosen on dev (greedy): {listed}; reported: {chosen}."


def select_alpha(dev_score: Callable[[float], float], alphas: tuple[float, ...] = (0.6, 1.0, 1.5, 2.0),
                 higher_is_better: bool = True) -> tuple[float, str]:
    """The GNMT length-penalty exponent to decode the test set with: the one of ``alphas`` whose beam
    search ``dev_score(alpha)`` (a dev-set metric) ranks first, as GNMT tuned it (Wu et al. 2016); never
    the test set. Returns it and a Markdown bullet with every candidate's score (ties: the first listed).
    """
    scores = {alpha: dev_score(alpha) for alpha in alphas}
    chosen = (max if higher_is_better else min)(scores, key=scores.get)
    listed = "; ".join(f"{alpha:g}: {score:.2f}" for alpha, score in scores.items())
    return chosen, f"- Length penalty chosen on dev (beam search, alpha: dev score): {listed}; reported: alpha {chosen:g}."
