"""How many requests `encdec serve` answers with many clients at once, with and without batching
requests together; beside it, the same words decoded in one Python call (no HTTP).

    python benchmarks/serve.py                      (the shipped G2P model, 32 clients, one word a request)
    python benchmarks/serve.py --model runs/bible-ylt-bbe/best --texts data/bible/ylt-bbe/test.src

Writes benchmarks/results/serve.md.
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def default_texts() -> list[str]:
    from recipes.g2p.prepare import read_test_set
    return sorted(read_test_set())[::7]


def start_server(model: Path, beam: int, max_batch: int) -> tuple[subprocess.Popen, str, int]:
    process = subprocess.Popen([sys.executable, "-m", "encdec", "serve", "--model", str(model), "--port", "0",
                                "--beam", str(beam), "--max-batch-sentences", str(max_batch)],
                               stdout=subprocess.PIPE, text=True, cwd=ROOT)
    line = process.stdout.readline()
    if not line.startswith("serving "):
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    host, port = line.split()[3].removeprefix("http://").rsplit(":", 1)
    return process, host, int(port)


def client(host: str, port: int, texts: list[str], per_request: int, stop_at: float, latencies: list[float],
           offset: int) -> None:
    """One client: a kept-alive connection sending request after request until ``stop_at``."""
    connection, i = http.client.HTTPConnection(host, port, timeout=120), offset
    while time.perf_counter() < stop_at:
        batch = [texts[(i + k) % len(texts)] for k in range(per_request)]
        i += per_request * 97  # spread the clients over the word list
        start = time.perf_counter()
        connection.request("POST", "/translate", json.dumps({"texts": batch}), {"content-type": "application/json"})
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise SystemExit(f"the server answered {response.status}: {body[:200]!r}")
        latencies.append(time.perf_counter() - start)
    connection.close()


def batches_decoded(host: str, port: int) -> int:
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request("GET", "/health")
    return json.loads(connection.getresponse().read())["batches_decoded"]


def measure(model: Path, texts: list[str], beam: int, max_batch: int, clients: int, per_request: int,
            seconds: float) -> dict:
    process, host, port = start_server(model, beam, max_batch)
    try:
        client(host, port, texts, per_request, time.perf_counter() + 1.0, [], 0)  # warm-up
        batches_before = batches_decoded(host, port)
        latencies: list[list[float]] = [[] for _ in range(clients)]
        stop_at = time.perf_counter() + seconds
        threads = [threading.Thread(target=client, args=(host, port, texts, per_request, stop_at, latencies[c], c))
                   for c in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        batches = batches_decoded(host, port) - batches_before
    finally:
        process.terminate()
        process.wait(timeout=60)
    done = [x for per_client in latencies for x in per_client]
    quantiles = statistics.quantiles(done, n=20)
    return {"requests/s": len(done) / elapsed, "texts/s": len(done) * per_request / elapsed,
            "p50 ms": 1000 * statistics.median(done), "p95 ms": 1000 * quantiles[18], "batches": batches,
            "requests": len(done)}


def direct(model: Path, texts: list[str], beam: int, seconds: float) -> float:
    """Texts/s of ``Translator.translate`` over the whole list in this process (no HTTP, no per-request work)."""
    from encdec import load

    translator = load(model)
    translator.translate(texts[:64], beam=beam)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        translator.translate(texts[done % len(texts):][:512], beam=beam)
        done += len(texts[done % len(texts):][:512])
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "g2p-en")
    parser.add_argument("--texts", type=Path, help="one text per line (default: CMUdict 0.7b test words)")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--per-request", type=int, default=1, help="texts in each request")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.md")
    args = parser.parse_args()
    texts = args.texts.read_text(encoding="utf-8").splitlines() if args.texts else default_texts()

    rows = []
    for max_batch in (1, 64):
        r = measure(args.model, texts, args.beam, max_batch, args.clients, args.per_request, args.seconds)
        rows.append(f"| `--max-batch-sentences {max_batch}` | {r['requests/s']:.1f} | {r['texts/s']:.1f} | "
                    f"{r['p50 ms']:.0f} | {r['p95 ms']:.0f} | {r['requests'] / max(r['batches'], 1):.1f} |")
        print(rows[-1], flush=True)
    rate = direct(args.model, texts, args.beam, args.seconds)
    rows.append(f"| `Translator.translate`, 512 texts a call, no HTTP | | {rate:.1f} | | | 512 |")
    import torch
    text = f"""# `encdec serve`: {args.clients} clients at once

Model `{args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model}`, beam {args.beam},
{args.per_request} text(s) a request, {args.seconds:.0f} s per setting, server and clients on this machine
({torch.get_num_threads()} threads for the model). Each client keeps one connection and sends its next
request when the last is answered.

| server | requests/s | texts/s | latency p50, ms | p95, ms | requests per decoding batch |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Reproduce: `python benchmarks/serve.py{' --model ' + str(args.model) if args.model != ROOT / 'models' / 'g2p-en' else ''}`.
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
