"""Time the fused output layer + loss per chunk size: why `encdec.loss.CHUNK_ROWS` is what it is.

    python benchmarks/loss_chunks.py                # small (8,000) and base (32,000) vocabularies, 2 threads (~2 min)
    python benchmarks/loss_chunks.py --threads 1

`linear_cross_entropy` makes the logits, the loss and their gradients a chunk of rows at a time, so
nothing of vocabulary size outlives its chunk. Few rows make small matrix products (slow per FLOP);
many rows make large chunks to allocate and walk (the softmax and the two gradient products). For each
vocabulary this prints the best-of-rounds seconds of one forward + backward over a training step's
~3,100 target tokens at several chunk sizes, in float32 and, where the CPU multiplies bf16 natively
(AMX / AVX512-BF16), under bf16 autocast, and writes the table to `results/loss-chunks.md`.
Chunk sizes are taken in turn within each round, so a slow minute of the machine hits them alike.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import encdec  # noqa: F401  before torch: MKL's AVX512 code on AMD CPUs (encdec/mkl.py)
import torch

import encdec.loss as loss_module
from encdec.loss import linear_cross_entropy
from encdec.train import bf16_is_native

TOKENS = 3100  # real target tokens in a 4,096-token training batch
VOCABULARIES = {"small": (256, 8000), "base": (512, 32000)}  # d_model, vocabulary
CHUNKS = (128, 256, 512, 1024)  # CHUNK_ROWS


def seconds(d_model: int, vocab: int, bf16: bool, rows: int, repeats: int = 3) -> float:
    """Best of ``repeats`` forward + backward passes with ``CHUNK_ROWS = rows``."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, d_model, generator=g).requires_grad_()
    weight = (torch.randn(vocab, d_model, generator=g) * 0.05).requires_grad_()
    target = torch.randint(0, vocab, (TOKENS,), generator=g)
    loss_module.CHUNK_ROWS = rows
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = linear_cross_entropy(hidden, weight, None, target, 0.1)
        loss.backward()
        best = min(best, time.perf_counter() - start)
        hidden.grad = weight.grad = None
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "loss-chunks.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default = loss_module.CHUNK_ROWS
    precisions = ["float32"] + (["bf16"] if bf16_is_native(torch.device("cpu")) else [])
    lines = []
    for name, (d_model, vocab) in VOCABULARIES.items():
        for precision in precisions:
            best = {c: float("inf") for c in CHUNKS}
            for _ in range(args.rounds):
                for c in CHUNKS:
                    best[c] = min(best[c], seconds(d_model, vocab, precision == "bf16", c))
            flops = 6 * TOKENS * d_model * vocab  # forward and the two gradients' products
            cells = [f"{best[c] * 1000:.0f} ms ({flops / best[c] / 1e9:.0f} GFLOP/s)"
                     for c in CHUNKS]
            lines.append(f"| {name} ({vocab:,}) | {precision} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    loss_module.CHUNK_ROWS = default
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    header = ["| vocabulary | precision | " + " | ".join(f"{c} rows" for c in CHUNKS) + " |",
              "|---|---|" + "---|" * len(CHUNKS)]
    text = "\n".join([f"# Fused output layer + loss: seconds per chunk size ({args.threads} threads)", "",
                      f"{cpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}. Command: "
                      f"`python benchmarks/loss_chunks.py --threads {args.threads}`. Forward + backward of "
                      f"{TOKENS:,} target tokens, best of {args.rounds} rounds; encdec uses {default}.",
                      "", *header, *lines, ""])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
