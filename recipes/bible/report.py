"""Score a trained Bible style-transfer model on the paper's test books; write benchmarks/results/bible-SRC-TGT.md.

    python recipes/bible/report.py --src ylt --tgt bbe --data data/bible/ylt-bbe --run runs/bible-ylt-bbe
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from encdec import load  # noqa: E402
from encdec.metrics import bleu, chrf  # noqa: E402
from encdec.plots import plot_training, read_log  # noqa: E402

# Carlson, Riddell & Rockmore (2018), test BLEU (multi-bleu.perl on untokenized text = sacreBLEU tokenize='none').
PUBLISHED = {("ylt", "bbe"): (24.01, 24.94), ("bbe", "asv"): (31.28, 30.17), ("kjv", "asv"): (76.77, 65.61)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True)
    parser.add_argument("--tgt", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or Path("benchmarks/results") / f"bible-{args.src}-{args.tgt}.md"

    sources = (args.data / "test.src").read_text(encoding="utf-8").splitlines()
    refs = (args.data / "test.tgt").read_text(encoding="utf-8").splitlines()
    outputs = load(args.run / "best").translate(sources, beam=args.beam)
    rows = [("copy the source", sources), (f"encdec Transformer, beam {args.beam}", outputs)]
    table = [f"| {name} | {bleu(h, refs, tokenize='none'):.2f} | {bleu(h, refs):.2f} | {chrf(h, refs):.2f} |"
             for name, h in rows]
    moses, seq2seq = PUBLISHED.get((args.src, args.tgt), (None, None))
    if moses is not None:
        table[:0] = [f"| Moses (Carlson et al. 2018) | {moses:.2f} | | |",
                     f"| Seq2Seq (Carlson et al. 2018) | {seq2seq:.2f} | | |"]
    log = read_log(args.run)
    curve = plot_training(args.run, out.with_name(f"bible-{args.src}-{args.tgt}-training.png"), metric="bleu")
    text = f"""# Bible style transfer {args.src.upper()} -> {args.tgt.upper()} (test: Judges, 1 Samuel, Philippians, Hebrews; {len(refs)} verses)

| system | BLEU (tokenize none, = multi-bleu.perl) | BLEU 13a | chrF |
|---|---|---|---|
{chr(10).join(table)}

- Training: {log[-1]['step']} steps, {log[-1]['elapsed_s'] / 60:.1f} minutes on this machine's 2 CPU cores.
- Training curve: `{curve.name}`. Reproduce: `bash recipes/bible/run.sh {args.src} {args.tgt}`.
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
