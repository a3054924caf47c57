"""Where one encdec training step goes on this CPU, and the MFU ceiling that leaves.

    python benchmarks/step_breakdown.py                      # small and base, 2 threads (~3 min)
    python benchmarks/step_breakdown.py --configs small --threads 1

For ``speed.py``'s encdec training step (same model shapes, data, batches and process setup), after
warm-up steps, over the same batches each time:

1. real target tokens/s and MFU (6 x params x tokens/s / the float32 matmul peak, measured here
   as ``speed.py`` does), nothing instrumented;
2. where training's float32 products go through oneDNN (``encdec.linear``'s probe picks it over MKL's
   default path), every product, in a second process run with ``ONEDNN_VERBOSE=2``: per kind
   (forward, input gradient, weight gradient; the output layer + loss's chunks apart), the time
   around the call and the time oneDNN reports for executing the product itself. The difference
   is the call's glue: a weight gradient's operand copied transposed (PyTorch's copy, one
   thread), building the product for a new shape (every batch has a new row count), allocating
   the output;
3. the rest by op, from the torch profiler's self times (its own cost inflates the many small ops,
   so these shares are indicative); where the products go through MKL (on its AVX512 path,
   :mod:`encdec.mkl`), their share and FLOP rate come from here too;

and the ceiling: the MFU if everything but the products took no time. Writes
``results/step-breakdown.md``. Measure on an idle machine: a shared VM's slow spells move single
figures by 5-10 %.
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

import encdec  # noqa: F401  before torch: MKL's AVX512 code on AMD CPUs (encdec/mkl.py)
import torch

from workload import CONFIGS, make_pairs

OTHER_OPS = 8  # the largest ops listed under "the rest"
WARMUP = 3  # steps before any measurement: first-call allocations, oneDNN kernels, thread pool
KIND, STEPS_DONE = "PRODUCT ", "STEPS "  # the verbose worker's own stdout lines


def product_kind(x: torch.Tensor, weight: torch.Tensor, vocab: int) -> str:
    """What an ``_onednn_product(x, weight)`` call computes, from its operands' layouts: ``product_tn``
    passes a transposed ``x`` (a weight gradient), the input gradient a transposed ``weight``."""
    transposed = lambda t: t.dim() == 2 and t.stride(0) == 1 and t.size(1) > 1  # noqa: E731
    kind = "weight gradient" if transposed(x) else "input gradient" if transposed(weight) else "forward"
    where = "output layer + loss" if vocab in (*x.shape, *weight.shape) else "encoder/decoder layers"
    return f"{where}: {kind}"


def setup(name: str, threads: int, steps: int):
    """speed.py's encdec training step, warmed up: (model, batches, step)."""
    from systems import train_system
    c = CONFIGS[name]
    torch.set_num_threads(threads)
    model, batches, step = train_system("encdec", c, make_pairs(4000, 3, c["vocab"]))  # sets the process up first
    if len(batches) < WARMUP + steps:
        raise SystemExit(f"{name}: {len(batches)} batches, need {WARMUP + steps}: lower --steps")
    for idx in batches[:WARMUP]:
        step(idx)
    return model, batches, step


def timed_steps(step, batches, n: int) -> tuple[float, int]:
    """Seconds and real target tokens of the ``n`` measured steps (the same batches every time)."""
    real, t0 = 0, time.perf_counter()
    for idx in batches[WARMUP:WARMUP + n]:
        real += step(idx)[0]
    return time.perf_counter() - t0, real


def verbose_worker(name: str, steps: int, threads: int) -> None:
    """Runs under ``ONEDNN_VERBOSE=2``: after each product, a line with its kind and the time around
    the call, following oneDNN's own lines for it; then the measured steps' seconds."""
    import encdec.linear as linear
    _, batches, step = setup(name, threads, steps)
    onednn_product, vocab = linear._onednn_product, CONFIGS[name]["vocab"]

    def reported_product(x, weight, bias=None):
        t0 = time.perf_counter()
        out = onednn_product(x, weight, bias)
        seconds = time.perf_counter() - t0
        print(f"{KIND}{product_kind(x, weight, vocab)},{seconds},{2 * x.size(0) * x.size(1) * weight.size(0)}",
              flush=True)
        return out

    linear._onednn_product = reported_product
    print(STEPS_DONE + "start", flush=True)
    seconds, _ = timed_steps(step, batches, steps)
    print(f"{STEPS_DONE}{seconds}", flush=True)


def products_in_place(name: str, steps: int, threads: int) -> tuple[dict, float, float]:
    """Per kind [calls, seconds around the call, seconds oneDNN executed, FLOP]; seconds of primitive
    creation (cache misses); the measured steps' seconds. From :func:`verbose_worker`'s output."""
    env = dict(os.environ, ONEDNN_VERBOSE="2", OMP_NUM_THREADS=str(threads))  # 2: creation too
    proc = subprocess.run([sys.executable, __file__, "--verbose-worker", name, str(steps), str(threads)],
                          env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"verbose worker failed:\n{proc.stderr[-3000:]}")
    per_kind = collections.defaultdict(lambda: [0, 0.0, 0.0, 0])
    created = executed = seconds = 0.0  # executed: oneDNN's exec lines since the last product's line
    started = False
    for line in proc.stdout.splitlines():
        if line.startswith(STEPS_DONE):  # "start", then the measured steps' seconds
            started = line == STEPS_DONE + "start"
            seconds = seconds if started else float(line[len(STEPS_DONE):])
        elif not started or not line.startswith(("onednn_verbose", KIND)):
            continue
        elif line.startswith(KIND):
            kind, around, flops = line[len(KIND):].rsplit(",", 2)
            entry = per_kind[kind]
            entry[0] += 1
            entry[1] += float(around)
            entry[2] += executed
            entry[3] += int(flops)
            executed = 0.0
        elif ",exec," in line:
            executed += float(line.rsplit(",", 1)[1]) / 1e3
        elif ",create:cache_miss," in line:
            created += float(line.rsplit(",", 1)[1]) / 1e3
    if not per_kind:
        raise SystemExit("no oneDNN products: this CPU or build trains through the BLAS, nothing to break down")
    return per_kind, created, seconds


def breakdown(name: str, steps: int, threads: int) -> list[str]:
    from speed import worker_peak
    c = CONFIGS[name]
    model, batches, step = setup(name, threads, steps)
    peak = worker_peak({"sizes": [2048, 3072], "repeats": 5})["gflops"]
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # 1. untouched
    seconds, real = timed_steps(step, batches, steps)
    wall, tokens = seconds / steps, real / steps
    mfu = 6 * params * tokens / wall / (peak * 1e9)

    # 2. the products, in a process of their own (oneDNN reads ONEDNN_VERBOSE at its start); where
    # they go through the BLAS (MKL), the profiler's FLOP counts below say what there is to say
    import encdec.linear as linear
    on_onednn = linear.onednn_beats_blas()
    if on_onednn:
        per_kind, created, verbose_seconds = products_in_place(name, steps, threads)
        around, executed, flops = (sum(e[i] for e in per_kind.values()) for i in (1, 2, 3))

    # 3. the rest, by op
    from torch.profiler import profile
    with profile() as prof:  # times: recording FLOPs (input shapes) slows some ops down several times
        timed_steps(step, batches, steps)
    events = prof.key_averages()
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in events}
    total = sum(ops.values())
    product_ops = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::addmm_")
    groups = {f"matrix products ({'oneDNN' if on_onednn else 'MKL'})": product_ops,
              "attention's own ops (flash kernel; written out: `bmm`, `where`, softmax backward)":
                  ("flash_attention", "aten::bmm", "aten::where", "_softmax_backward_data"),
              "copies (`aten::copy_`: transposed operands, casts, layouts)": ("aten::copy_",),
              "dropout's random bits (`aten::random_`)": ("aten::random_",),
              "Adam (fused)": ("_fused_adam",)}
    grouped = {g: sum(t for k, t in ops.items() if any(p in k for p in pats)) for g, pats in groups.items()}
    rest = sorted(((k, t) for k, t in ops.items() if not any(p in k for pats in groups.values() for p in pats)),
                  key=lambda kv: -kv[1])

    ms = lambda s: f"{s / steps * 1e3:.1f}"  # noqa: E731  seconds over the measured steps -> ms a step
    lines = [f"## {name} (d_model {c['d']}, ff {c['ff']}, {c['layers']}+{c['layers']} layers, vocabulary "
             f"{c['vocab']}), {threads} thread(s)", "",
             f"- {tokens:.0f} real target tokens a step, {wall * 1e3:.0f} ms a step: {tokens / wall:.0f} tokens/s, "
             f"**MFU {mfu:.2f}** ({params / 1e6:.1f}M parameters, float32 peak {peak:.0f} GFLOP/s measured here)"]
    if on_onednn:
        lines += [
            f"- matrix products through oneDNN ({flops / 1e9 / steps:.0f} GFLOP a step): {around / verbose_seconds:.0%} "
            f"of the step around the calls ({flops / around / 1e9:.0f} GFLOP/s), {executed / verbose_seconds:.0%} in "
            f"oneDNN's execution ({flops / executed / 1e9:.0f} GFLOP/s, {flops / executed / 1e9 / peak:.0%} of "
            f"the peak); building products for new shapes {ms(created)} ms a step",
            f"- ceiling: with everything but the products' execution gone, MFU "
            f"{mfu * verbose_seconds / executed:.2f}; with the calls' glue kept, {mfu * verbose_seconds / around:.2f}",
            "", "| products | calls/step | ms/step around the call | in oneDNN | glue | GFLOP/s in oneDNN |",
            "|---|---|---|---|---|---|"]
        for kind, (calls, t_around, t_exec, f) in sorted(per_kind.items()):
            lines.append(f"| {kind} | {calls / steps:.0f} | {ms(t_around)} | {ms(t_exec)} | {ms(t_around - t_exec)} "
                         f"| {f / t_exec / 1e9:.0f} |")
    else:
        with profile(with_flops=True) as counted:  # the same steps again, for the products' FLOPs only
            timed_steps(step, batches, steps)
        flops = sum(e.flops for e in counted.key_averages() if e.key in product_ops)
        t_products = sum(e.self_cpu_time_total for e in events if e.key in product_ops) / 1e6
        lines += [
            f"- matrix products through MKL (`mm`, `addmm`, `addmm_`; {flops / 1e9 / steps:.0f} GFLOP a step, the profiler "
            f"counting none for `addmm_`): "
            f"{t_products / total:.0%} of the profiled step at {flops / t_products / 1e9:.0f} GFLOP/s "
            f"({flops / t_products / 1e9 / peak:.0%} of the peak)",
            f"- ceiling: with everything but the products gone, MFU {mfu * total / t_products:.2f}"]
    lines += ["", f"Torch profiler, self time ({total / steps * 1e3:.0f} ms a profiled step against "
              f"{wall * 1e3:.0f} unprofiled):", "", "| ops | ms/step | share |", "|---|---|---|"]
    for g, t in grouped.items():
        lines.append(f"| {g} | {ms(t)} | {t / total:.1%} |")
    lines.append(f"| everything else ({len(rest)} ops) | {ms(sum(t for _, t in rest))} | "
                 f"{sum(t for _, t in rest) / total:.1%} |")
    for k, t in rest[:OTHER_OPS]:
        lines.append(f"| &nbsp;&nbsp; `{k}` | {ms(t)} | {t / total:.1%} |")
    return lines + [""]


def main() -> None:
    if sys.argv[1:2] == ["--verbose-worker"]:
        name, steps, threads = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        return verbose_worker(name, steps, threads)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="small,base", help="comma-separated, from: " + ", ".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=6, help="measured steps (default 6)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "step-breakdown.md")
    args = parser.parse_args()
    os.environ["SPEED_THREADS"] = str(args.threads)  # read by speed.py's peak measurement
    lines = ["# Where an encdec training step goes", "",
             f"`python benchmarks/step_breakdown.py --configs {args.configs} --steps {args.steps} --threads "
             f"{args.threads}` on {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}", ""]
    for name in args.configs.split(","):
        lines += breakdown(name, args.steps, args.threads)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
