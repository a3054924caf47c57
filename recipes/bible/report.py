"""Score a trained Bible style-transfer model on the paper's test books; write benchmarks/results/bible-SRC-TGT.md.

    python recipes/bible/report.py --src ylt --tgt bbe --data data/bible/ylt-bbe --run runs/bible-ylt-bbe
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import yaml

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from encdec import load  # noqa: E402
from encdec.checkpoint import load_model_folder  # noqa: E402
from encdec.metrics import bleu, chrf  # noqa: E402
from encdec.plots import plot_training, read_log  # noqa: E402
from encdec.train import bf16_is_native  # noqa: E402

# Carlson, Riddell & Rockmore (2018), test BLEU (multi-bleu.perl on untokenized text = sacreBLEU tokenize='none').
PUBLISHED = {("ylt", "bbe"): (24.01, 24.94), ("bbe", "asv"): (31.28, 30.17), ("kjv", "asv"): (76.77, 65.61)}


def translate(model_dir: Path, sources: list[str], beam: int, precision: str = "fp32") -> tuple[list[str], float]:
    """The model's outputs for ``sources`` and the seconds decoding took."""
    translator = load(model_dir, precision=precision)
    start = time.perf_counter()
    outputs = translator.translate(sources, beam=beam)
    return outputs, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", required=True)
    parser.add_argument("--tgt", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--wall-seconds", type=float, help="wall time of preparation + training, from run.sh")
    parser.add_argument("--extra", default="", help="the arguments run.sh passed on to encdec train")
    args = parser.parse_args()
    out = args.out or Path("benchmarks/results") / f"bible-{args.src}-{args.tgt}.md"

    sources = (args.data / "test.src").read_text(encoding="utf-8").splitlines()
    refs = (args.data / "test.tgt").read_text(encoding="utf-8").splitlines()
    model_dir = args.run / "best"
    outputs, seconds = translate(model_dir, sources, args.beam)
    outputs8, seconds8 = translate(model_dir, sources, args.beam, "int8")
    rows = [("copy the source", sources), (f"**encdec Transformer, beam {args.beam}**", outputs),
            ("the same model decoded in int8 (`--int8`)", outputs8)]
    timings = f"{seconds:.0f} s in float32, {seconds8:.0f} s in int8"
    if bf16_is_native(torch.device("cpu")):  # bf16 decoding only pays where the CPU has it natively
        outputs16, seconds16 = translate(model_dir, sources, args.beam, "bf16")
        rows.insert(2, ("the same model decoded in bf16 (`--bf16`)", outputs16))
        timings += f", {seconds16:.0f} s in bf16"
    table = [f"| {name} | {bleu(h, refs, tokenize='none'):.2f} | {bleu(h, refs):.2f} | {chrf(h, refs):.2f} |"
             for name, h in rows]
    moses, seq2seq = PUBLISHED.get((args.src, args.tgt), (None, None))
    if moses is not None:
        table[:0] = [f"| Moses (Carlson et al. 2018) | {moses:.2f} | | |",
                     f"| Seq2Seq (Carlson et al. 2018) | {seq2seq:.2f} | | |"]
    log = read_log(args.run)
    config = yaml.safe_load((args.run / "config.yaml").read_text(encoding="utf-8"))
    threads = config["train"].get("threads") or os.cpu_count()
    best = max(log, key=lambda r: r["bleu"])
    params = load_model_folder(model_dir)[0].num_parameters()
    weights = model_dir / "model.safetensors"
    extra = f" {args.extra}" if args.extra else ""
    wall = (f"; {args.wall_seconds / 60:.1f} minutes wall time with data preparation and validations"
            if args.wall_seconds else "")
    curve = plot_training(args.run, out.with_name(f"bible-{args.src}-{args.tgt}-training.png"), metric="bleu")
    text = f"""# Bible style transfer {args.src.upper()} -> {args.tgt.upper()} (test: Judges, 1 Samuel, Philippians, Hebrews; {len(refs)} verses)

| system | BLEU (tokenize none, = multi-bleu.perl) | BLEU 13a | chrF |
|---|---|---|---|
{chr(10).join(table)}

- Dev ({config["data"]["dev"][0].rsplit("/", 2)[-2]}: 1 Kings, Zephaniah, Mark, Colossians): greedy BLEU (13a) {best["bleu"]:.2f} at step {best["step"]}, the model kept.
- Training: {log[-1]["step"]} steps, {log[-1]["elapsed_s"] / 60:.1f} minutes of training steps, {threads} CPU thread(s)
  on this 2-core machine, from scratch{wall}; learning-rate schedule `{config["train"].get("schedule", "inverse_sqrt")}`.
- Model: {params / 1e6:.2f} M parameters, {weights.stat().st_size / 2**20:.1f} MiB of weights.
- Decoding the test set: {timings} (beam {args.beam}, {torch.get_num_threads()} thread(s)).
- Training curve: `{curve.name}`.

Reproduce: `bash recipes/bible/run.sh {args.src} {args.tgt}{extra}`.
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
