"""Time one Linear layer per kernel at decoding's shapes: why `encdec.inference` picks what it picks.

    python benchmarks/linear_kernels.py             # small and base models' shapes, 2 threads (~1 min)
    python benchmarks/linear_kernels.py --threads 1

Decoding multiplies a few rows (one per live hypothesis: 1 for batch-1 greedy, 32 for batch-32
greedy, 160 for batch-32 beam 5) by each weight matrix. For every (rows, in, out) this prints the
median milliseconds per call of

- `F.linear` (float32, MKL), `PackedLinear` float32 (what decoding uses) and bf16, and the two float32
  products it picks between: `oneDNN packed` (oneDNN blocked weights; what PackedLinear uses without
  the C kernel) and `C panels` (`encdec.decode_kernels.linear` on `W^T` in panels of 16 columns),
- `fbgemm int8`: torch.ao dynamic quantization (what `prepare_for_cpu(.., "int8")` falls back to),
- `oneDNN int8`: `Int8Linear`'s oneDNN product at any row count, `quantize only`: its activation
  quantization alone (part of that time), and
- `Int8Linear`: what `prepare_for_cpu(.., "int8")` uses where the CPU has VNNI / AMX-INT8 (oneDNN
  from `Int8Linear.ONEDNN_ROWS` rows up, fbgemm below),

and writes the table to `results/linear-kernels.md`. Measure on an idle machine.

Those timings call one layer again and again, so from 1 to 32 rows its weights come from the cache.
A decoding step reads each matrix once, in turn, and the small model's 20 MB or the base model's
154 MB of them mostly come from memory (or a last-level cache they share). The second table times
that: one whole decoder step's matrices (6 per layer and the output layer) per kernel, in order.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path
from unittest import mock

import encdec  # noqa: F401  before torch: MKL's AVX512 code on AMD CPUs (encdec/mkl.py)
import torch
import torch.nn.functional as F
from torch import nn

from encdec import decode_kernels
from encdec.inference import Int8Linear, PackedLinear, int8_onednn_available, onednn_available, quantize_activations
from encdec.train import bf16_is_native

SHAPES = [(256, 256), (256, 1024), (512, 512), (512, 1024), (512, 2048), (2048, 512), (512, 32000)]  # small, base
ROWS = [1, 5, 32, 160]
MODELS = {"small": (256, 1024, 3, 8000), "base": (512, 2048, 6, 32000)}  # d_model, ff, decoder layers, vocabulary


def step_shapes(d: int, ff: int, layers: int, vocab: int) -> list[tuple[int, int]]:
    """(in, out) of the matrices one decoding step multiplies, in order: per layer the self-attention's
    Q/K/V and output, the encoder-decoder attention's query and output, the feed-forward's two; then
    the output layer (the encoder-decoder keys and values are computed once per sentence, not here)."""
    return [(d, 3 * d), (d, d), (d, d), (d, d), (d, ff), (ff, d)] * layers + [(d, vocab)]


def step_ms(fns: list, xs: list, repeats: int = 7) -> float:
    """Median milliseconds of calling ``fns[i](xs[i])`` for every i in turn."""
    times = []
    for _ in range(repeats + 1):  # the first round warms up (allocations, thread pool)
        start = time.perf_counter()
        for fn, x in zip(fns, xs):
            fn(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def median_ms(fn, x: torch.Tensor, seconds: float = 0.25) -> float:
    """Median of repeated timings, each long enough (>= ~2 ms) for the clock."""
    fn(x)
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < 0.02:
        fn(x)
        calls += 1
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t = time.perf_counter()
        for _ in range(calls):
            fn(x)
        times.append((time.perf_counter() - t) / calls * 1e3)
    return statistics.median(times)


def kernels(linear: nn.Linear) -> dict:
    out = {"F.linear": lambda x: F.linear(x, linear.weight, linear.bias)}
    if onednn_available():
        out["PackedLinear fp32"] = PackedLinear(linear)  # what decoding uses: one of the next two by rows
        with mock.patch.object(decode_kernels, "available", lambda: False):
            out["oneDNN packed"] = PackedLinear(linear)
    if decode_kernels.available():
        panels, bias = decode_kernels.column_panels(linear.weight.detach(), linear.bias.detach())
        out["C panels"] = lambda x: decode_kernels.linear(x, panels, bias, linear.out_features)
    if onednn_available():
        if bf16_is_native(torch.device("cpu")):
            out["PackedLinear bf16"] = PackedLinear(linear, dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        out["fbgemm int8"] = quantize_dynamic(nn.Sequential(copy.deepcopy(linear)),
                                              {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    if int8_onednn_available():
        out["oneDNN int8"] = Int8Linear(linear)
        out["oneDNN int8"].ONEDNN_ROWS = 0
        out["quantize only"] = quantize_activations
        out["Int8Linear"] = Int8Linear(linear)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "linear-kernels.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows_out, names = [], None
    with torch.inference_mode():
        for n_in, n_out in SHAPES:
            linear = nn.Linear(n_in, n_out).eval()
            ks = kernels(linear)
            names = list(ks)
            for rows in ROWS:
                x = torch.randn(rows, n_in)
                ms = [median_ms(k, x) for k in ks.values()]
                rows_out.append(f"| {rows} | {n_in} x {n_out} | " + " | ".join(f"{m:.3f}" for m in ms) + " |")
                print(rows_out[-1], flush=True)
    step_rows, step_names = [], None
    with torch.inference_mode():
        for model, dims in MODELS.items():
            linears = [nn.Linear(n_in, n_out).eval() for n_in, n_out in step_shapes(*dims)]
            per_layer = [kernels(linear) for linear in linears]
            step_names = [name for name in per_layer[0] if name != "quantize only"]
            for rows in ROWS:
                xs = [torch.randn(rows, linear.in_features) for linear in linears]
                ms = [step_ms([k[name] for k in per_layer], xs) for name in step_names]
                step_rows.append(f"| {model} | {rows} | " + " | ".join(f"{m:.2f}" for m in ms) + " |")
                print(step_rows[-1], flush=True)
            del per_layer
    header = ["| rows | in x out | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    step_header = ["| model | rows | " + " | ".join(step_names) + " |", "|---|---|" + "---|" * len(step_names)]
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), "?")
    text = "\n".join([f"# One Linear layer per kernel: median ms per call ({args.threads} threads)", "",
                      f"{cpu}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}. "
                      f"Command: `python benchmarks/linear_kernels.py --threads {args.threads}`.", "",
                      *header, *rows_out, "",
                      "## One decoder step: every matrix once, in turn (median ms per step)", "",
                      *step_header, *step_rows, ""])
    args.out.write_text(text)
    print("\n".join(header + rows_out + [""] + step_header + step_rows))


if __name__ == "__main__":
    main()
