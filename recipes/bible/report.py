"""Score a trained Bible style-transfer model on the paper's test books; write benchmarks/results/bible-SRC-TGT.md.

    python recipes/bible/report.py --src ylt --tgt bbe --data data/bible/ylt-bbe --run runs/bible-ylt-bbe

Several ``--run`` folders (trained with the same tokenizers) are scored as an ensemble, each member
chosen on dev first, and each member alone is reported beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import encdec  # noqa: E402,F401  before torch: MKL's AVX512 code on AMD CPUs (encdec/mkl.py)
import torch  # noqa: E402
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
    parser.add_argument("--run", type=Path, nargs="+", required=True, help="run folder; several: an ensemble")
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
    out.parent.mkdir(parents=True, exist_ok=True)

    sources = (args.data / "test.src").read_text(encoding="utf-8").splitlines()
    refs = (args.data / "test.tgt").read_text(encoding="utf-8").splitlines()
    dev_sources = (args.data / "dev.src").read_text(encoding="utf-8").splitlines()
    dev_refs = (args.data / "dev.tgt").read_text(encoding="utf-8").splitlines()
    members, selections = [], []
    for k, run in enumerate(args.run, 1):
        folder, selection = select_on_dev(
            run, lambda folder: bleu(translate(folder, dev_sources, beam=1)[0], dev_refs), higher_is_better=True)
        members.append(folder)
        selections.append(selection if len(args.run) == 1 else selection.replace("- Model,", f"- Model {k},", 1))
    model = members[0] if len(members) == 1 else members
    if args.alpha is None:  # dev BLEU as the table reports it (tokenize none)
        alpha, alpha_line = select_alpha(lambda a: bleu(translate(model, dev_sources, beam=args.beam, alpha=a)[0],
                                                        dev_refs, tokenize="none"), alphas=ALPHAS)
    else:
        alpha, alpha_line = args.alpha, f"- Length penalty: alpha {args.alpha:g} (`--alpha`)."
    rows, timings = [("copy the source", [untag(line) for line in sources])], []
    system = (f"**encdec Transformer, beam {args.beam}**" if len(members) == 1 else
              f"**encdec, ensemble of {len(members)} Transformers, beam {args.beam}**")
    for precision in decoding_precisions():
        outputs, seconds = translate(model, sources, precision, beam=args.beam, alpha=alpha)
        rows.append((row_name(precision, system), outputs))
        timings.append(f"{seconds:.0f} s in {precision}")
    if len(members) > 1:
        for k, (run, folder) in enumerate(zip(args.run, members), 1):
            rows.append((f"model {k} of the ensemble alone (`{run.name}/{folder.name}`), beam {args.beam}",
                         translate(folder, sources, beam=args.beam, alpha=alpha)[0]))
    table = [f"| {name} | {bleu(h, refs, tokenize='none'):.2f} | {bleu(h, refs):.2f} | {chrf(h, refs):.2f} |"
             for name, h in rows]
    source, extra_sources = parse_sources(args.src)
    moses, seq2seq = PUBLISHED.get((source, args.tgt), (None, None))
    if moses is not None:
        table[:0] = [f"| Moses (Carlson et al. 2018) | {moses:.2f} | | |",
                     f"| Seq2Seq (Carlson et al. 2018) | {seq2seq:.2f} | | |"]
    config = yaml.safe_load((args.run[0] / "config.yaml").read_text(encoding="utf-8"))
    dev_lines, summaries, curves = [], [], []
    for k, run in enumerate(args.run, 1):
        best = max(read_log(run), key=lambda r: r["bleu"])
        which = "" if len(args.run) == 1 else f"model {k}: "
        dev_lines.append(f"- Dev ({config['data']['dev'][0].rsplit('/', 2)[-2]}: 1 Kings, Zephaniah, Mark, Colossians): "
                         f"{which}greedy BLEU (13a) {best['bleu']:.2f} at step {best['step']} in training, the model "
                         "kept as `best/`.")
        summaries.append(training_summary(run, args.wall_seconds if k == 1 else None).replace(
            "- Training:", f"- Training{' of model ' + str(k) if which else ''}:", 1))
        suffix = "" if len(args.run) == 1 else f"-{k}"
        curves.append(plot_training(run, out.with_name(f"bible-{name}-training{suffix}.png"), metric="bleu").name)
    if len(args.run) > 1:
        summaries.append(f"- The {len(args.run)} models trained side by side, at the same time; the wall time in "
                         "model 1's line is that of the whole invocation.")
    params = load_model_folder(members[0])[0].num_parameters()
    weights = members[0] / "model.safetensors"
    size = "" if len(members) == 1 else f"{len(members)} models of "
    extra = f" {args.extra}" if args.extra else ""
    also = f", training also on {', '.join(extra_sources).upper()} -> {args.tgt.upper()}" if extra_sources else ""
    if sources and untag(sources[0]) != sources[0]:
        also += ", sources tagged with their edition"
    text = f"""# Bible style transfer {source.upper()} -> {args.tgt.upper()}{also} (test: Judges, 1 Samuel, Philippians, Hebrews; {len(refs)} verses)

| system | BLEU (tokenize none, = multi-bleu.perl) | BLEU 13a | chrF |
|---|---|---|---|
{chr(10).join(table)}

{chr(10).join(dev_lines)}
{chr(10).join(selections)}
{alpha_line}
{chr(10).join(summaries)}
- Model: {size}{params / 1e6:.2f} M parameters, {weights.stat().st_size / 2**20:.1f} MiB of weights.
- Decoding the test set: {', '.join(timings)} (beam {args.beam}, {torch.get_num_threads()} thread(s)).
- Training curve{'s' if len(curves) > 1 else ''}: {', '.join(f'`{c}`' for c in curves)}.

Reproduce: `bash recipes/bible/run.sh {args.src} {args.tgt}{args.run_flags}{extra}`.
"""
    out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
