"""Training attention on a CPU: PyTorch's flash kernel against the product written out, by key length.

    python benchmarks/attention_kernels.py              # 4 and 8 heads, 12-256 keys, 2 threads (~1 min)
    python benchmarks/attention_kernels.py --threads 1

Forward + backward of one attention call the way a training step makes it: ~4,000 tokens a batch
(sentences x length), queries, keys and values as views of one fused ``(batch, length, 3, heads,
64)`` projection, a key-padding mask (encoder, encoder-decoder attention) or the causal mask
(decoder). Median milliseconds per call of ``F.scaled_dot_product_attention`` (the flash kernel)
and of ``encdec.attention.scaled_dot_product`` (scores, softmax and weighted sum as three calls).
``encdec.attention`` trains with the written-out form below ``TRAINING_WRITTEN_OUT_BELOW`` keys.
Writes ``results/attention-kernels.md``.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import encdec  # noqa: F401  before torch: MKL's AVX512 code on AMD CPUs (encdec/mkl.py)
import torch
import torch.nn.functional as F

from encdec.attention import TRAINING_WRITTEN_OUT_BELOW, scaled_dot_product, subsequent_mask

TOKENS = 4000
KERNELS = {"flash": lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
           "written out": lambda q, k, v, mask: scaled_dot_product(q, k, v, mask)[0]}


def forward_backward_ms(heads: int, length: int, causal: bool, repeats: int) -> dict[str, float]:
    """Median ms of one forward + backward per kernel, the kernels taking turns."""
    g = torch.Generator().manual_seed(0)
    batch = TOKENS // length
    qkv = torch.randn(batch, length, 3, heads, 64, generator=g, requires_grad=True)
    if causal:
        mask = subsequent_mask(length)
    else:
        lengths = torch.randint(length // 2, length + 1, (batch,), generator=g)
        mask = (torch.arange(length) < lengths[:, None])[:, None, None, :]
    times: dict[str, list[float]] = {name: [] for name in KERNELS}
    for _ in range(repeats + 1):  # the first round warms up
        for name, kernel in KERNELS.items():
            start = time.perf_counter()
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (batch, heads, length, 64) views
            out = kernel(q, k, v, mask)
            out.backward(torch.ones_like(out))
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heads", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--lengths", type=int, nargs="+", default=[12, 16, 24, 32, 48, 61, 64, 96, 128, 256])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "attention-kernels.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["# Training attention: flash kernel against written out (forward + backward, ms a call)", "",
             f"`python benchmarks/attention_kernels.py --threads {args.threads}` on "
             f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}. ~{TOKENS} tokens a call, head "
             f"dimension 64, median of {args.repeats}; encdec trains written out below "
             f"{TRAINING_WRITTEN_OUT_BELOW} keys.", "",
             "| heads | keys | sentences | padding mask: flash | written out | causal mask: flash | written out |",
             "|---|---|---|---|---|---|---|"]
    for heads in args.heads:
        for length in args.lengths:
            pad = forward_backward_ms(heads, length, False, args.repeats)
            causal = forward_backward_ms(heads, length, True, args.repeats)
            lines.append(f"| {heads} | {length} | {TOKENS // length} | {pad['flash']:.2f} | {pad['written out']:.2f} "
                         f"| {causal['flash']:.2f} | {causal['written out']:.2f} |")
            print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines[:4]))


if __name__ == "__main__":
    main()
