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



def test_select_on_dev_compares_best_with_averages_of_the_last_checkpoints(tmp_path):
    from test_train import make_reverse_task, reverse_config
    from encdec.checkpoint import load_model_folder
    from encdec.train import Trainer
    from recipes.reporting import select_on_dev

    make_reverse_task(tmp_path / "data", n_train=200, n_dev=10)
    run = tmp_path / "run"
    Trainer(reverse_config(tmp_path / "data", max_steps=6, validate_every=2), run).train()  # steps 2, 4, 6
    seen = []

    def fake_dev_score(folder):  # a stand-in metric: prefers the 2-checkpoint average
        seen.append(folder.name)
        return {"averaged-last-2": 3.0, "best": 2.0}.get(folder.name, 1.0)
    chosen, line = select_on_dev(run, fake_dev_score, higher_is_better=True, last=(2, 5))
    assert seen == ["best", "averaged-last-2", "averaged-last-3"]  # 5 is capped at the 3 checkpoints kept
    assert chosen == run / "averaged-last-2"
    assert "the average of the last 2 checkpoints (steps 4-6) 3.00" in line and line.endswith("(steps 4-6).")
    chosen, _ = select_on_dev(run, fake_dev_score, higher_is_better=False, last=(2, 5))
    assert chosen == run / "averaged-last-3"
    # the averaged folder is a model whose weights are the checkpoints' mean
    mean = {k: (a + b) / 2 for (k, a), b in zip(load_model_folder(run / "checkpoints" / "step-00000004")[0]
                                               .state_dict().items(),
                                               load_model_folder(run / "checkpoints" / "step-00000006")[0]
                                               .state_dict().values())}
    for k, v in load_model_folder(run / "averaged-last-2")[0].state_dict().items():
        torch.testing.assert_close(v, mean[k])


def test_select_alpha_takes_the_dev_best_and_lists_every_candidate():
    from recipes.reporting import select_alpha

    seen = []

    def dev_bleu(alpha):  # a stand-in metric peaking at 1.5
        seen.append(alpha)
        return 30.0 - (alpha - 1.5) ** 2
    alpha, line = select_alpha(dev_bleu)
    assert seen == [0.6, 1.0, 1.5, 2.0] and alpha == 1.5
    assert "0.6: 29.19" in line and "1.5: 30.00" in line and line.endswith("reported: alpha 1.5.")
    assert select_alpha(dev_bleu, higher_is_better=False)[0] == 0.6  # an error rate: lowest wins
    assert select_alpha(lambda a: 1.0, alphas=(1.0, 2.0))[0] == 1.0  # ties: the first listed
