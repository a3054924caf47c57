"""Score a trained Bible style-transfer model on the paper's test books; write benchmarks/results/bible-SRC-TGT.md.

    python recipes/bible/report.py --src ylt --tgt bbe --data data/bible/ylt-bbe --run runs/bible-ylt-bbe
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from encdec.checkpoint import load_model_folder  # noqa: E402
from encdec.metrics import bleu, chrf  # noqa: E402
from encdec.plots import plot_training, read_log  # noqa: E402
from recipes.bible.prepare import parse_sources, untag  # noqa: E402
from recipes.reporting import (decoding_precisions, row_name, select_alpha, select_on_dev,  # noqa: E402
                               training_summary, translate)


# Carlson, Riddell & Rockmore (2018), test BLEU (multi-bleu.perl on untokenized text = sacreBLEU tokenize='none').
PUBLISHED = {("ylt", "bbe"): (24.01, 24.94), ("bbe", "asv"): (31.28, 30.17), ("kjv", "asv"): (76.77, 65.61)}

# Length penalties tried on dev. The plain BBE sources are shorter than their ASV targets, and
# BBE -> ASV took the largest of 0.6-2 every time, so the grid goes on to 3.
ALPHAS = (0.6, 1.0, 1.5, 2.0, 2.5, 3.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True, help="as prepare.py's: the source, then any extra training sources after +")
    parser.add_argument("--tgt", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--alpha", type=float, help="length penalty (default: the best on dev of " + ", ".join(f"{a:g}" for a in ALPHAS) + ")")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--wall-seconds", type=float, help="wall time of preparation + training, from run.sh")
    parser.add_argument("--extra", default="", help="the arguments run.sh passed on to encdec train")
    parser.add_argument("--run-flags", default="", help="run.sh's own flags, for the reproduce line")
    parser.add_argument("--name", help="the results' name (default SRC-TGT)")
    args = parser.parse_args()
    name = args.name or f"{args.src}-{args.tgt}"
    out = args.out or Path("benchmarks/results") / f"bible-{name}.md"

    sources = (args.data / "test.src").read_text(encoding="utf-8").splitlines()
    refs = (args.data / "test.tgt").read_text(encoding="utf-8").splitlines()
    dev_sources = (args.data / "dev.src").read_text(encoding="utf-8").splitlines()
    dev_refs = (args.data / "dev.tgt").read_text(encoding="utf-8").splitlines()
    model_dir, selection = select_on_dev(
        args.run, lambda folder: bleu(translate(folder, dev_sources, beam=1)[0], dev_refs), higher_is_better=True)
    if args.alpha is None:  # dev BLEU as the table reports it (tokenize none)
        alpha, alpha_line = select_alpha(lambda a: bleu(translate(model_dir, dev_sources, beam=args.beam, alpha=a)[0],
                                                        dev_refs, tokenize="none"), alphas=ALPHAS)
    else:
        alpha, alpha_line = args.alpha, f"- Length penalty: alpha {args.alpha:g} (`--alpha`)."
    rows, timings = [("copy the source", [untag(line) for line in sources])], []
    for precision in decoding_precisions():
        outputs, seconds = translate(model_dir, sources, precision, beam=args.beam, alpha=alpha)
        rows.append((row_name(precision, f"**encdec Transformer, beam {args.beam}**"), outputs))
        timings.append(f"{seconds:.0f} s in {precision}")
    table = [f"| {name} | {bleu(h, refs, tokenize='none'):.2f} | {bleu(h, refs):.2f} | {chrf(h, refs):.2f} |"
             for name, h in rows]
    source, extra_sources = parse_sources(args.src)
    moses, seq2seq = PUBLISHED.get((source, args.tgt), (None, None))
    if moses is not None:
        table[:0] = [f"| Moses (Carlson et al. 2018) | {moses:.2f} | | |",
                     f"| Seq2Seq (Carlson et al. 2018) | {seq2seq:.2f} | | |"]
    log = read_log(args.run)
    config = yaml.safe_load((args.run / "config.yaml").read_text(encoding="utf-8"))
    best = max(log, key=lambda r: r["bleu"])
    params = load_model_folder(model_dir)[0].num_parameters()
    weights = model_dir / "model.safetensors"
    extra = f" {args.extra}" if args.extra else ""
    curve = plot_training(args.run, out.with_name(f"bible-{name}-training.png"), metric="bleu")
    also = f", training also on {', '.join(extra_sources).upper()} -> {args.tgt.upper()}" if extra_sources else ""
    if sources and untag(sources[0]) != sources[0]:
        also += ", sources tagged with their edition"
    text = f"""# Bible style transfer {source.upper()} -> {args.tgt.upper()}{also} (test: Judges, 1 Samuel, Philippians, Hebrews; {len(refs)} verses)

| system | BLEU (tokenize none, = multi-bleu.perl) | BLEU 13a | chrF |
|---|---|---|---|
{chr(10).join(table)}

- Dev ({config["data"]["dev"][0].rsplit("/", 2)[-2]}: 1 Kings, Zephaniah, Mark, Colossians): greedy BLEU (13a) {best["bleu"]:.2f} at step {best["step"]} in training, the model kept as `best/`.
{selection}
{alpha_line}
{training_summary(args.run, args.wall_seconds)}
- Model: {params / 1e6:.2f} M parameters, {weights.stat().st_size / 2**20:.1f} MiB of weights.
- Decoding the test set: {', '.join(timings)} (beam {args.beam}, {torch.get_num_threads()} thread(s)).
- Training curve: `{curve.name}`.

Reproduce: `bash recipes/bible/run.sh {args.src} {args.tgt}{args.run_flags}{extra}`.
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
