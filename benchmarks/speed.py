"""Training and decoding speed of encdec against plain PyTorch, Hugging Face and CTranslate2 on CPU.

    python benchmarks/speed.py                  # small and base, training and decoding (~15 min)
    python benchmarks/speed.py --quick          # small only, fewer steps (<= 3 min), to debug
    python benchmarks/speed.py --only decode --configs base

Every system gets the same model shape, the same synthetic data and the same
number of threads. Each measurement runs in its own subprocess (this script,
called with ``--worker``) so its peak RSS is its own and no system inherits
another's warm caches or thread pools. Results: a Markdown table on stdout and
in ``benchmarks/results/speed.md`` (``speed-quick.md`` with ``--quick``), the raw
numbers in the ``.json`` next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from systems import build_decoding_models, decoder, train_system
from workload import CONFIGS, MAX_NEW, decode_sources, make_pairs

THREADS = int(os.environ.get("SPEED_THREADS", 2))  # set by --threads; workers inherit it
RESULT = "RESULT "  # prefix of the one stdout line a worker answers with


# --- workers (each runs in its own process) ---------------------------------------------------

def worker_peak(spec: dict) -> dict:
    """Matmul GFLOP/s in ``spec["dtype"]`` (float32 or bfloat16): the best of a few large square
    products, through ``torch.mm`` (the BLAS: MKL) and through oneDNN; the faster library's figure
    is the machine's peak (the MFU denominator). With ``spec["system"] == "torch"`` the process keeps
    MKL's default code path (the peers' ``torch.mm``: AVX2 on AMD CPUs, less than half the AVX512
    figure on the EPYC); otherwise MKL runs its AVX512 code there too (:mod:`encdec.mkl`)."""
    import torch
    from encdec.linear import _onednn_product, onednn_available
    torch.set_num_threads(THREADS)
    dtype = getattr(torch, spec.get("dtype", "float32"))
    by_library = {}
    for library in ("torch.mm", "oneDNN") if onednn_available() else ("torch.mm",):
        best = 0.0
        for n in spec["sizes"]:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            if library == "torch.mm":
                product = lambda: a @ b  # noqa: E731
            else:
                product = lambda: _onednn_product(a, b)  # noqa: E731
            product()  # first call allocates and warms the thread pool
            for _ in range(spec["repeats"]):
                start = time.perf_counter()
                product()
                best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
        by_library[library] = best
    return {"gflops": max(by_library.values()), "by_library": by_library, "torch": torch.__version__}


def worker_bandwidth(spec: dict) -> dict:
    """Read bandwidth in GB/s over ``spec["bytes"]`` of float32, read again and again (as decoding
    re-reads its weights each step, from the cache where they fit): the best of a few sums."""
    import torch
    torch.set_num_threads(THREADS)
    x = torch.ones(spec["bytes"] // 4)
    x.sum()
    best = 0.0
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return {"gb_per_s": best}


def streamed_bytes(c: dict) -> int:
    """float32 weight bytes one decoding step reads: per decoder layer W_Q, W_K, W_V and W_O of
    self-attention, W_Q and W_O of encoder-decoder attention (its keys and values are computed
    once per sentence) and the feed-forward pair; then the output layer."""
    d = c["d"]
    return 4 * (c["layers"] * (6 * d * d + 2 * d * c["ff"]) + c["vocab"] * d)


def bound_lines(rows: dict, c: dict, gb_per_s: float) -> list[str]:
    """Batch-1 greedy decoding against the memory-bandwidth bound: every step reads the decoder's
    and output layer's weights once, so float32 can't go faster than bandwidth / those bytes."""
    mb = streamed_bytes(c) / 1e6
    bound = gb_per_s * 1e3 / mb
    parts = ", ".join(f"{name} {r['greedy b1']['tokens_per_s'] / bound:.0%}" for name, r in rows.items()
                      if name in ("encdec", "hf", "ct2-float32"))
    return [f"Batch-1 bound: each float32 step reads {mb:.0f} MB of weights; at {gb_per_s:.1f} GB/s (measured: "
            "summing an array of that size again and again, from the cache where it fits) "
            f"that allows at most {bound:.0f} tokens/s. Greedy b1 reaches {parts} of it (int8 and bf16 read "
            "a quarter and a half of the bytes).", ""]


def worker_train(spec: dict) -> dict:
    """Tokens/s of one system: ``warmup`` untimed steps, then up to ``steps`` (at least 2) within ``budget_s``.

    Under torchrun (``spec["ranks"] > 1``) every rank runs this with its share of the threads; the
    token counts and peak RSS are summed over the ranks.
    """
    import torch
    import torch.distributed as dist
    ranks = spec.get("ranks", 1)
    if ranks > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(max(1, THREADS // ranks))
    c = CONFIGS[spec["config"]]
    model, batches, step = train_system(spec["system"], c, make_pairs(4000, 3, c["vocab"]), ranks)
    for idx in batches[:spec["warmup"]]:
        step(idx)
    real = padded = done = 0
    start = time.perf_counter()
    for idx in batches[spec["warmup"]:spec["warmup"] + spec["steps"]]:
        r, p = step(idx)
        real, padded, done = real + r, padded + p, done + 1
        # every rank must take the same decision, so rank 0's clock decides for all
        over = torch.tensor([float(done >= 2 and time.perf_counter() - start > spec["budget_s"])])
        if ranks > 1:
            dist.broadcast(over, 0)
        if over.item():
            break
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)  # tied weights count once
    rss = torch.tensor([max_rss_mib()])
    if ranks > 1:
        dist.all_reduce(rss)
        dist.destroy_process_group()
    return {"params": params, "steps": done, "step_s": seconds / done, "tokens_per_step": real / done,
            "real_fraction": real / padded, "tokens_per_s": real / seconds, "max_rss_mib": float(rss)}


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker_prepare(spec: dict) -> dict:
    """The random Marian model every system decodes with, and its CTranslate2 conversions, in ``spec["dir"]``."""
    import torch
    torch.set_num_threads(THREADS)
    return build_decoding_models(CONFIGS[spec["config"]], Path(spec["dir"]))


def worker_decode(spec: dict) -> dict:
    """Greedy and beam 5: the first ``n1`` sources one at a time, and the first ``batch`` (32) as one batch."""
    import torch
    torch.set_num_threads(THREADS)
    c = CONFIGS[spec["config"]]
    run = decoder(spec["system"], c, Path(spec["dir"]), THREADS)
    src, result = decode_sources(c["vocab"]), {}
    for beam in (1, 5):
        run(src[:2], beam)  # warm-up: first-call allocations, thread pools
        for batch in (1, spec["batch"]):
            start, outputs = time.perf_counter(), []
            for i in range(0, spec["n1"] if batch == 1 else batch, batch):
                outputs += run(src[i:i + batch], beam)
            seconds = time.perf_counter() - start
            result[f"{'greedy' if beam == 1 else f'beam{beam}'} b{batch}"] = {
                "tokens_per_s": sum(map(len, outputs)) / seconds, "ms": 1000 * seconds * batch / len(outputs),
                "mean_length": float(np.mean([len(o) for o in outputs])), "outputs": outputs}
    result["max_rss_mib"] = max_rss_mib()
    return result


# --- driver -----------------------------------------------------------------------------------

def in_subprocess(kind: str, spec: dict, timeout: float = 900) -> dict:
    """Run ``worker_<kind>(spec)`` in a fresh interpreter (``spec["ranks"]`` of them under torchrun,
    sharing the threads) and return its (rank 0's) result."""
    ranks = spec.get("ranks", 1)
    threads = str(max(1, THREADS // ranks))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    proc = subprocess.run([*launcher, __file__, "--worker", kind, json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker {kind} {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def best_of_rounds(runs: list[dict]) -> dict:
    """One system's decoding result from several rounds of ``worker_decode``: per mode, the round
    with the most tokens/s (this VM's noise only ever slows a run down), and every round's tokens/s
    in ``rounds_tokens_per_s``."""
    best: dict = {"max_rss_mib": max(r["max_rss_mib"] for r in runs)}
    for mode in (k for k in runs[0] if k != "max_rss_mib"):
        rounds = [r[mode] for r in runs]
        best[mode] = {**max(rounds, key=lambda m: m["tokens_per_s"]),
                      "rounds_tokens_per_s": [m["tokens_per_s"] for m in rounds]}
    return best


def machine_info(command: str) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": THREADS, "python": platform.python_version(),
            **{p: version(p) for p in ("torch", "transformers", "ctranslate2")}, "command": command,
            "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_at_start": os.getloadavg()[0]}


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def train_table(rows: dict, peak: float, peak_bf16: float) -> list[str]:
    """One row a system; bf16 rows' MFU is against the bf16 peak and their ratio against encdec-bf16."""
    out = ["| system | params | steps | real tgt tokens/step | real/padded | tokens/s | MFU | peak RSS MiB "
           "| encdec / system (same precision) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        bf16 = name.endswith("-bf16")
        mfu = 6 * r["params"] * r["tokens_per_s"] / ((peak_bf16 if bf16 else peak) * 1e9)
        ours = rows["encdec-bf16" if bf16 else "encdec"]
        out.append(f"| {name} | {r['params'] / 1e6:.1f}M | {r['steps']} | {r['tokens_per_step']:.0f} | "
                   f"{r['real_fraction']:.0%} | {r['tokens_per_s']:.0f} | {mfu:.1%} | {r['max_rss_mib']:.0f} | "
                   f"{ratio(ours['tokens_per_s'], r['tokens_per_s'])} |")
    return out


def decode_table(rows: dict) -> list[str]:
    out = ["| mode | system | tokens/s | latency | mean length | same tokens as encdec | encdec / system "
           "| tokens/s in each round |", "|---|---|---|---|---|---|---|---|"]
    ours = rows["encdec"]
    for mode in [k for k in ours if k != "max_rss_mib"]:
        unit = "ms/sentence" if mode.endswith("b1") else "ms/batch"
        for name, r in rows.items():
            m = r[mode]
            same = sum(a == b for a, b in zip(m["outputs"], ours[mode]["outputs"]))
            out.append(f"| {mode} | {name} | {m['tokens_per_s']:.0f} | {m['ms']:.0f} {unit} | {m['mean_length']:.1f} "
                       f"| {same}/{len(m['outputs'])} | {ratio(ours[mode]['tokens_per_s'], m['tokens_per_s'])} "
                       f"| {' / '.join(f'{x:.0f}' for x in m['rounds_tokens_per_s'])} |")
    return out


def target_table(rows: dict) -> list[str]:
    """The issue's decoding targets side by side: vs HF, and same precision vs CTranslate2; bf16
    (CTranslate2 has no bf16 on CPUs) against CTranslate2's faster of float32 and int8. Each cell is
    the ratio of the best rounds and, with several rounds, in brackets each round's own ratio (the
    systems run in turn within a round, so a round's pair saw about the same machine)."""
    bf16 = "encdec-bf16" in rows
    out = ["| mode | encdec / hf | encdec / ct2-float32 | encdec-int8 / ct2-int8 |"
           + (" encdec-bf16 / fastest ct2 |" if bf16 else ""), "|---|---|---|---|" + ("---|" if bf16 else "")]

    def cell(mode: str, ours: str, *peers: str) -> str:
        best = {name: rows[name][mode]["tokens_per_s"] for name in (ours, *peers)}
        text = ratio(best[ours], max(best[p] for p in peers))
        rounds = [rows[name][mode]["rounds_tokens_per_s"] for name in (ours, *peers)]
        if len(rounds[0]) > 1:
            text += f" ({' / '.join(f'{a / max(b):.2f}' for a, *b in zip(*rounds))})"
        return text

    for mode in [k for k in rows["encdec"] if k != "max_rss_mib"]:
        out.append(f"| {mode} | {cell(mode, 'encdec', 'hf')} | {cell(mode, 'encdec', 'ct2-float32')} | "
                   f"{cell(mode, 'encdec-int8', 'ct2-int8')} |"
                   + (f" {cell(mode, 'encdec-bf16', 'ct2-float32', 'ct2-int8')} |" if bf16 else ""))
    return out


def main() -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small config, few steps: a <= 3 minute smoke run")
    parser.add_argument("--only", choices=("train", "decode"), help="run one half only")
    parser.add_argument("--configs", default=None, help="comma-separated, from: " + ", ".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=2, help="torch/CTranslate2 threads (default 2)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="decoding rounds, every system once per round in turn; the best round counts "
                             "(default 2, --quick 1)")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default benchmarks/results/speed[-quick])")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker[1])
        if spec.get("system", "encdec").startswith("encdec"):
            import encdec  # noqa: F401  before torch: MKL's AVX512 code on AMD CPUs (encdec/mkl.py)
        else:  # the peers as their users run them: MKL's default path
            os.environ["ENCDEC_MKL_AVX512"] = "0"
        result = globals()[f"worker_{args.worker[0]}"](spec)
        if os.environ.get("RANK", "0") == "0":
            print(RESULT + json.dumps(result), flush=True)
        return
    THREADS = args.threads
    os.environ["SPEED_THREADS"] = str(THREADS)  # for the workers
    configs = (args.configs or ("small" if args.quick else "small,base")).split(",")
    # --quick: fewer steps, and decoding batches of 8 (HF beam search on 32 sentences alone takes ~30 s)
    # 35 s a training system: the full run took 13-17 minutes with 45 s (2-core EPYCs, 2026-12-04/07)
    steps, warmup, budget, n1, nb = (4, 1, 20, 2, 8) if args.quick else (10, 1, 35, 8, 32)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    if rounds < 1:
        parser.error("--rounds must be at least 1")
    out = args.out or Path(__file__).parent / "results" / ("speed-quick" if args.quick else "speed")
    info, run_start = machine_info("python " + " ".join(shlex.quote(a) for a in sys.argv)), time.perf_counter()
    print(f"{info['cpu']}, {THREADS} threads; measuring matmul peak", file=sys.stderr)
    sizes = [2048] if args.quick else [2048, 3072]
    peaks = in_subprocess("peak", {"sizes": sizes, "repeats": 5})
    peers_mm = in_subprocess("peak", {"sizes": sizes, "repeats": 5, "system": "torch"})["by_library"]["torch.mm"]
    peaks["by_library"]["torch.mm, MKL's default path (the peers')"] = peers_mm
    peak = peaks["gflops"] = max(peaks["by_library"].values())
    # bf16 rows where the CPU multiplies bf16 in hardware (AMX / AVX512-BF16); emulated bf16 is slow
    from encdec.train import bf16_is_native
    import torch
    bf16 = bf16_is_native(torch.device("cpu"))
    peaks_bf16 = in_subprocess("peak", {"sizes": sizes, "repeats": 5, "dtype": "bfloat16"}) if bf16 else {}
    peak_bf16 = peaks_bf16.get("gflops", 0.0)
    results: dict = {"machine": info, "peak_gflops": peak, "peak_bf16_gflops": peak_bf16,
                     "peak_by_library": {"float32": peaks["by_library"], "bf16": peaks_bf16.get("by_library", {})},
                     "train": {}, "decode": {}}
    by_library = lambda p: ", ".join(f"{k} {v:.0f}" for k, v in p["by_library"].items())  # noqa: E731
    lines = ["# encdec speed", "", f"`{info['command']}` on {info['date']}", "",
             f"- CPU: {info['cpu']} ({info['cores']} cores), {THREADS} threads everywhere; load average at start "
             f"{info['load_average_at_start']:.1f} (well above 0 means something else was running: PyTorch's "
             "thread pool then slows down many times over, so such numbers are not comparable)",
             f"- Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
             f"ctranslate2 {info['ctranslate2']}",
             f"- matmul peak, the faster library's: {peak:.0f} GFLOP/s in float32 ({by_library(peaks)}), "
             + (f"{peak_bf16:.0f} GFLOP/s in bf16 ({by_library(peaks_bf16)})" if bf16 else "no native bf16 (no bf16 rows)")
             + "; MFU = 6 x params x real target tokens/s / the peak of the row's precision",
             "- encdec / system: encdec's tokens/s divided by the system's (> 1: encdec is faster)", ""]
    for name in configs:
        c = CONFIGS[name]
        title = f"{name} (d_model {c['d']}, {c['heads']} heads, ff {c['ff']}, {c['layers']}+{c['layers']} layers, " \
                f"vocabulary {c['vocab']})"
        if args.only != "decode":
            print(f"training {name}", file=sys.stderr)
            spec = {"config": name, "steps": steps, "warmup": warmup, "budget_s": budget}
            systems = ("encdec", "torch", "hf") + (("encdec-bf16", "hf-bf16") if bf16 else ())
            rows = results["train"][name] = {s: in_subprocess("train", {**spec, "system": s}) for s in systems}
            if THREADS > 1:  # torchrun -m encdec -- train: one process per thread
                rows[f"encdec, {THREADS} processes"] = in_subprocess(
                    "train", {**spec, "system": "encdec", "ranks": THREADS})
            lines += [f"## Training, {title}", "",
                      "encdec: length-bucketed batches of <= 4096 padded tokens, label-smoothed loss over real tokens "
                      "only. torch (nn.Transformer) and hf (MarianMTModel): random batches of a fixed sentence "
                      "count (~4096 padded tokens), loss over every position. `encdec, N processes`: encdec's step as "
                      "`torchrun -m encdec -- train` runs it, N processes of one thread, each with every N-th "
                      "sentence of the batch, DDP over gloo (RSS summed). `-bf16`: the same step under "
                      "`torch.autocast` bf16 (what `train.precision: bf16` and HF's `bf16=True` do). Adam, fused for every "
                      "system (HF's Trainer defaults to it). encdec's rows run MKL's AVX512 code (`encdec.mkl`), the peers' "
                      "MKL's default path, as each system's users get it. tokens/s counts real (non-pad) "
                      f"target tokens; {warmup} warm-up steps, then up to {steps} steps or {budget} s.", "",
                      *train_table(rows, peak, peak_bf16), ""]
        if args.only != "train":
            print(f"decoding {name}", file=sys.stderr)
            with tempfile.TemporaryDirectory() as folder:
                prep = in_subprocess("prepare", {"config": name, "dir": folder})
                spec = {"config": name, "dir": folder, "n1": n1, "batch": nb}
                systems = ("encdec", "hf", "ct2-float32", "encdec-int8", "ct2-int8") + (("encdec-bf16",) if bf16 else ())
                # Round after round, every system in turn: a slow spell of the machine then hits all
                # of them in some round instead of one system's only run.
                runs: dict = {s: [] for s in systems}
                for _ in range(rounds):
                    for s in systems:
                        runs[s].append(in_subprocess("decode", {**spec, "system": s}))
                rows = {s: best_of_rounds(runs[s]) for s in systems}
            gb_per_s = in_subprocess("bandwidth", {"bytes": streamed_bytes(c), "repeats": 10})["gb_per_s"]
            results["decode"][name] = {"prepare": prep, "bandwidth_gb_s": gb_per_s, **rows}
            lines += [f"## Decoding, {title}", "",
                      f"One random MarianMTModel (end token fitted to stop near the source length, RMSE "
                      f"{prep['fit_rmse']:.2f}) loaded by each system; sources of 25-35 tokens; at most {MAX_NEW} new "
                      f"tokens; beam: length penalty 0, stop at 5 finished. b1: the first {n1} sources one by one; "
                      f"b{nb}: the first {nb} as one batch. tokens/s counts output tokens (no end token). "
                      f"{rounds} round(s), every system once per round in turn; each mode's best round is "
                      "reported (the last column lists them all).", "",
                      *decode_table(rows), "", "Targets (tokens/s ratios; want >= 2 for HF, >= 1 for CTranslate2):", "",
                      *target_table(rows), "", *bound_lines(rows, c, gb_per_s)]
    info["load_average_at_end"], info["run_seconds"] = os.getloadavg()[0], time.perf_counter() - run_start
    lines.append(f"Load average at the end: {info['load_average_at_end']:.1f}. The whole run took "
                 f"{info['run_seconds'] // 60:.0f} min {info['run_seconds'] % 60:.0f} s.")
    print("\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for rows in results["decode"].values():  # the token lists fed the agreement column; the JSON keeps numbers
        for r in (r for r in rows.values() if isinstance(r, dict)):
            for m in r.values():
                if isinstance(m, dict):
                    m.pop("outputs", None)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
