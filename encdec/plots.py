"""Pictures: the training curve of a run and the attention weights of one translation."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from .translator import Translator  # noqa: E402


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training log; is {run_dir} a run folder that has validated once?")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_training(run_dir: str | Path, out: str | Path, metric: str | None = None) -> Path:
    """Train/dev loss and the validation metric against steps, from ``run_dir/log.jsonl``."""
    log = read_log(run_dir)
    steps = [r["step"] for r in log]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(steps, [r["train_loss"] for r in log], label="train (label-smoothed)")
    left.plot(steps, [r["dev_loss"] for r in log], label="dev")
    left.set(xlabel="step", ylabel="loss per target token", title="loss")
    left.legend()
    metric = metric or next((m for m in ("wer", "per", "bleu", "chrf", "exact") if m in log[-1]), "dev_ppl")
    right.plot(steps, [r[metric] for r in log], marker="o", color="tab:green")
    right.set(xlabel="step", ylabel=metric, title=f"dev {metric}")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_attention(translator: Translator, sentence: str, out: str | Path, layer: int = -1) -> Path:
    """Encoder-decoder attention of the last (or given) decoder layer, averaged over heads, for one greedy output."""
    model = translator.model
    output = translator.translate([sentence], beam=1, on_unknown="ignore")[0]
    src_ids = translator.encode([sentence], on_unknown="ignore")[0]
    tgt_ids = translator.tgt_tok.encode(output)
    src = torch.tensor([src_ids], device=translator.device)
    tgt_in = torch.tensor([[model.cfg.decoder_start_id] + tgt_ids], device=translator.device)
    model.record_attention(True)
    try:
        with torch.no_grad():
            model(src, tgt_in)
        weights = model.decoder.layers[layer].cross_attn.weights[0].mean(0).cpu()  # (tgt_len, src_len)
    finally:
        model.record_attention(False)
    src_labels = [translator.src_tok.decode([i]) or "</s>" for i in src_ids]
    tgt_labels = [translator.tgt_tok.decode([i]) for i in tgt_ids] + ["</s>"]
    fig, ax = plt.subplots(figsize=(max(4, len(src_labels) * 0.4), max(3, len(tgt_labels) * 0.35)))
    ax.imshow(weights.numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(src_labels)), src_labels, rotation=90)
    ax.set_yticks(range(len(tgt_labels)), tgt_labels)
    ax.set(xlabel="source", ylabel="output", title="encoder-decoder attention (mean over heads)")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
