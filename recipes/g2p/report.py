"""Score a trained G2P model on the CMUdict 0.7b test split and write benchmarks/results/g2p.md.

    python recipes/g2p/report.py --run runs/g2p --data data/g2p      (or --model FOLDER to score that one)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import encdec  # noqa: E402,F401  before torch: MKL's AVX512 code on AMD CPUs (encdec/mkl.py)
import torch  # noqa: E402
from encdec.checkpoint import load_model_folder, stored_weights  # noqa: E402
from encdec.metrics import symbol_error_rate, word_error_rate  # noqa: E402
from encdec.plots import plot_training, read_log  # noqa: E402
from recipes.g2p.prepare import load_references  # noqa: E402
from recipes.reporting import (decoding_precisions, row_name, select_alpha, select_on_dev,  # noqa: E402
                               training_summary, translate)

PUBLISHED = [("Bidirectional LSTM (Yao & Zweig 2015)", 23.55, 5.45),
             ("Attention encoder-decoder ensemble (Toshniwal & Livescu 2016)", 20.24, 4.69)]


def score(model_dir: Path, refs_path: Path, beam: int, precision: str = "fp32",
          alpha: float = 0.0) -> tuple[float, float, float, int]:
    """WER %, PER %, decoding seconds and the number of words, for the words in ``refs_path``."""
    references = load_references(refs_path)
    words = list(references)
    outputs, seconds = translate(model_dir, words, precision, beam=beam, alpha=alpha)
    refs = [references[w] for w in words]
    return word_error_rate(outputs, refs), symbol_error_rate(outputs, refs), seconds, len(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the model to score (default: chosen on dev from the run)")
    parser.add_argument("--run", type=Path, default=Path("runs/g2p"))
    parser.add_argument("--data", type=Path, default=Path("data/g2p"))
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--alpha", type=float, help="length penalty (default: the best on dev of 0, 0.6, 1)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/g2p.md"))
    parser.add_argument("--wall-seconds", type=float, help="wall time of preparation + training, from run.sh")
    parser.add_argument("--extra", default="", help="the arguments run.sh passed on to encdec train")
    parser.add_argument("--shipped", type=Path, help="also score this exported copy (e.g. models/g2p-en)")
    args = parser.parse_args()

    dev = args.data / "dev.refs.tsv"
    selection = ""
    if args.model is None:
        args.model, selection = select_on_dev(args.run, lambda folder: score(folder, dev, beam=1)[0],
                                              higher_is_better=False)
        selection = selection.replace("(greedy)", "(greedy WER)") + "\n"
    if args.alpha is None:  # dev WER of the beam search; pronunciations are short, so 0 (none) is a candidate
        alpha, alpha_line = select_alpha(lambda a: score(args.model, dev, args.beam, alpha=a)[0],
                                         alphas=(0.0, 0.6, 1.0), higher_is_better=False)
    else:
        alpha, alpha_line = args.alpha, f"- Length penalty: alpha {args.alpha:g} (`--alpha`)."
    dev_wer, dev_per, _, _ = score(args.model, dev, args.beam, alpha=alpha)
    rows, timings = [f"| {name} | {w:.2f} | {p:.2f} |" for name, w, p in PUBLISHED], []
    for precision in decoding_precisions():
        wer, per, seconds, n = score(args.model, args.data / "test.refs.tsv", args.beam, precision, alpha)
        cells = f"**{wer:.2f}** | **{per:.2f}**" if precision == "fp32" else f"{wer:.2f} | {per:.2f}"
        name = row_name(precision, f"**encdec Transformer, one model, beam {args.beam}**")
        rows.append(f"| {name} | {cells} |")
        timings.append(f"{seconds:.1f} s in {precision} ({n / seconds:.0f} words/s)")
    shipped = ""
    if args.shipped is not None:
        wer, per, _, _ = score(args.shipped, args.data / "test.refs.tsv", args.beam, alpha=alpha)
        stored = stored_weights(args.shipped)
        rows.append(f"| the shipped copy `{args.shipped}` ({stored} weights, float32 decoding) | {wer:.2f} | {per:.2f} |")
        size = (args.shipped / "model.safetensors").stat().st_size / 2**20
        shipped = (f"- Shipped: `encdec export --model {args.model} --out {args.shipped} --weights {stored}`, "
                   f"{size:.1f} MiB of weights.\n")
    log = read_log(args.run)
    weights = args.model / "model.safetensors"
    params = load_model_folder(args.model)[0].num_parameters()
    curve = plot_training(args.run, args.out.with_name("g2p-training.png"), metric="wer")
    extra = f" {args.extra}" if args.extra else ""
    text = f"""# CMUdict grapheme-to-phoneme (0.7b test split: {n} words)

Word error rate (a word is right if it equals any of its reference pronunciations) and
phoneme error rate (edit distance to the closest reference / its length), in percent.

| system | WER % | PER % |
|---|---|---|
{chr(10).join(rows)}

- Dev (every 20th package word, never the test set): WER {dev_wer:.2f}, PER {dev_per:.2f} (beam {args.beam});
  in training, the best greedy dev WER was at step {min(log, key=lambda r: r['wer'])['step']} (`best/`).
{selection}{alpha_line}
{training_summary(args.run, args.wall_seconds)}
- Model: {params / 1e6:.2f} M parameters, {weights.stat().st_size / 2**20:.1f} MiB of weights.
{shipped}- Decoding the test set (beam {args.beam}, {torch.get_num_threads()} thread(s)): {', '.join(timings)}.
- Training curve: `{curve.name}`.

Reproduce: `bash recipes/g2p/run.sh{extra}` (prepare, train with `recipes/g2p/config.yaml`, then
`python recipes/g2p/report.py --run {args.run}`, which chooses the model on dev; `--model {args.model}` scores this one).
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
