"""Score a trained G2P model on the CMUdict 0.7b test split and write benchmarks/results/g2p.md.

    python recipes/g2p/report.py --model runs/g2p/best --run runs/g2p --data data/g2p
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from encdec import load  # noqa: E402
from encdec.checkpoint import load_model_folder  # noqa: E402
from encdec.metrics import symbol_error_rate, word_error_rate  # noqa: E402
from encdec.plots import plot_training, read_log  # noqa: E402
from recipes.g2p.prepare import load_references  # noqa: E402

PUBLISHED = [("Bidirectional LSTM (Yao & Zweig 2015)", 23.55, 5.45),
             ("Attention encoder-decoder ensemble (Toshniwal & Livescu 2016)", 20.24, 4.69)]


def score(model_dir: Path, refs_path: Path, beam: int, int8: bool = False) -> tuple[float, float, float, int]:
    references = load_references(refs_path)
    words = list(references)
    translator = load(model_dir, precision="int8" if int8 else "fp32")
    start = time.perf_counter()
    outputs = translator.translate(words, beam=beam, alpha=0.0)
    seconds = time.perf_counter() - start
    refs = [references[w] for w in words]
    return word_error_rate(outputs, refs), symbol_error_rate(outputs, refs), seconds, len(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/g2p/best"))
    parser.add_argument("--run", type=Path, default=Path("runs/g2p"))
    parser.add_argument("--data", type=Path, default=Path("data/g2p"))
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/g2p.md"))
    args = parser.parse_args()

    dev_wer, dev_per, _, _ = score(args.model, args.data / "dev.refs.tsv", args.beam)
    wer, per, seconds, n = score(args.model, args.data / "test.refs.tsv", args.beam)
    wer8, per8, seconds8, _ = score(args.model, args.data / "test.refs.tsv", args.beam, int8=True)
    log = read_log(args.run)
    weights = args.model / "model.safetensors"
    params = load_model_folder(args.model)[0].num_parameters()
    curve = plot_training(args.run, args.out.with_name("g2p-training.png"), metric="wer")
    rows = [f"| {name} | {w:.2f} | {p:.2f} |" for name, w, p in PUBLISHED]
    rows.append(f"| **encdec Transformer, one model, beam {args.beam}** | **{wer:.2f}** | **{per:.2f}** |")
    rows.append(f"| the same model decoded in int8 (`--int8`) | {wer8:.2f} | {per8:.2f} |")
    text = f"""# CMUdict grapheme-to-phoneme (0.7b test split: {n} words)

Word error rate (a word is right if it equals any of its reference pronunciations) and
phoneme error rate (edit distance to the closest reference / its length), in percent.

| system | WER % | PER % |
|---|---|---|
{chr(10).join(rows)}

- Dev (every 20th package word, never the test set): WER {dev_wer:.2f}, PER {dev_per:.2f}.
- Training: {log[-1]['step']} steps, {log[-1]['elapsed_s'] / 60:.1f} minutes of training on this machine's 2 CPU cores
  (model selected by dev WER at step {min(log, key=lambda r: r['wer'])['step']}).
- Model: {params / 1e6:.2f} M parameters, {weights.stat().st_size / 2**20:.1f} MiB of weights.
- Decoding the test set: {seconds:.1f} s ({n / seconds:.0f} words/s, beam {args.beam}); in int8
  {seconds8:.1f} s ({n / seconds8:.0f} words/s).
- Training curve: `{curve.name}`.

Reproduce: `bash recipes/g2p/run.sh` (prepare, train with `recipes/g2p/config.yaml`, then
`python recipes/g2p/report.py --model {args.model} --run {args.run}`).
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
