"""Tests for what the recipes' reports share (recipes/reporting.py)."""

import json

import torch
import yaml

from encdec.train import bf16_is_native
from recipes.reporting import training_summary


def _run_folder(tmp_path, train: dict, steps=(1000, 2000), seconds=(60.0, 150.0)):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": train}), encoding="utf-8")
    rows = [{"step": s, "elapsed_s": e, "bleu": 1.0} for s, e in zip(steps, seconds)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return tmp_path


def test_training_summary_reads_the_last_log_row_and_the_config(tmp_path):
    run = _run_folder(tmp_path, {"threads": 1, "schedule": "cosine", "precision": "bf16"})
    line = training_summary(run, wall_seconds=600)
    assert line.startswith("- Training: 2000 steps, 2.5 minutes of training steps, 1 CPU thread(s)")
    assert "10.0 minutes wall time" in line and "`cosine`" in line and "precision `bf16`" in line


def test_training_summary_defaults_and_resolves_auto_precision(tmp_path):
    run = _run_folder(tmp_path, {"precision": "auto"})
    line = training_summary(run)
    resolved = "bf16" if bf16_is_native(torch.device("cpu")) else "fp32"
    assert "wall time" not in line and "`inverse_sqrt`" in line and f"precision `auto: {resolved} here`" in line

