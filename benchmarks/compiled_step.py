"""Probe: would a compiled decoding step (torch.compile, inductor) make greedy decoding faster on a CPU?

    python benchmarks/compiled_step.py [--rows 1 8 32] [--steps 48] [--threads 2]

encdec's decoding step runs ~100 small PyTorch operations per token (a few rows through the
decoder layers), and at batch 1 most of its time is their fixed cost, not arithmetic: where
CTranslate2 runs the same model in C++, it is ~2x faster. This script measures what compiling
the step would win before the search is reworked for it. It times, for the small model of
``speed.py`` (random weights, a random 30-token source per row):

- ``eager``: what greedy search does now: :func:`prepare_for_cpu` (packed weights),
  :meth:`Transformer.decode_step` with the growing :class:`KVCache`, the output layer, argmax;
- ``static``: the same step written for a compiler (:func:`static_step`): caches of fixed size
  written at a position tensor, attention over every slot with later ones masked, so every
  step has the same shapes; run eagerly;
- ``compiled``: ``static`` through ``torch.compile`` (inductor, weights frozen, C++ wrapper).

Every mode decodes ``--steps`` tokens per row from the same start (no early end), and the table
gives milliseconds per step, the compile time, and how many of the tokens equal ``eager``'s.
Results go to ``benchmarks/results/compiled-step.md``.

Measured (2-core AMD EPYC with AVX512-BF16, 2 threads, 2026-12-06): compiled 0.92 / 2.49 / 6.01 ms a
step at 1 / 8 / 32 rows against eager's 0.69 / 1.38 / 2.82, the same tokens: no gain, so the search
keeps its eager step.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import encdec  # noqa: F401  before torch: MKL's AVX512 code on AMD CPUs (encdec/mkl.py)
import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from encdec import ModelConfig, build_model  # noqa: E402
from encdec.attention import padding_mask  # noqa: E402
from encdec.inference import prepare_for_cpu  # noqa: E402
from encdec.model import Transformer  # noqa: E402
from encdec.search import most_probable  # noqa: E402
from workload import CONFIGS  # noqa: E402  (the small model speed.py measures)


def static_step(model: Transformer, last: Tensor, position: Tensor, self_k: Tensor, self_v: Tensor,
                cross_k: Tensor, cross_v: Tensor, src_mask: Tensor | None) -> Tensor:
    """One greedy step on fixed-size caches: each row's last token ``(rows,)`` -> its next ``(rows,)``.

    ``position``: 0-d long tensor, the step's target position; ``self_k`` / ``self_v``
    ``(layers, rows, heads, capacity, head_dim)``, written at ``position`` in place;
    ``cross_k`` / ``cross_v`` ``(layers, rows, heads, src_len, head_dim)``; ``src_mask``
    ``(rows, 1, 1, src_len)`` bool or ``None``.
    """
    rows, capacity = last.size(0), self_k.size(3)
    index = position.view(1)
    x = model.tgt_embed(last) + model.tgt_pos.table.index_select(0, index)  # (rows, d_model)
    seen = (torch.arange(capacity, device=last.device) <= position)[None]  # (1, capacity): slots filled so far
    for i, layer in enumerate(model.decoder.layers):
        sa, ca = layer.self_attn, layer.cross_attn

        def self_attention(y: Tensor) -> Tensor:
            qkv = sa.in_proj(y).view(rows, 3, sa.heads, sa.head_dim)
            self_k[i].index_copy_(2, index, qkv[:, 1, :, None])
            self_v[i].index_copy_(2, index, qkv[:, 2, :, None])
            out = F.scaled_dot_product_attention(qkv[:, 0, :, None], self_k[i], self_v[i], attn_mask=seen)
            return sa.out_proj(out.reshape(rows, sa.d_model))

        def cross_attention(y: Tensor) -> Tensor:
            q = ca.q_proj(y).view(rows, ca.heads, 1, ca.head_dim)
            out = F.scaled_dot_product_attention(q, cross_k[i], cross_v[i], attn_mask=src_mask)
            return ca.out_proj(out.reshape(rows, ca.d_model))

        x = layer.sublayers[0](x, self_attention)
        x = layer.sublayers[1](x, cross_attention)
        x = layer.sublayers[2](x, layer.feed_forward)
    return model.output(model.decoder.norm(x)).argmax(-1)


def eager_greedy(model: Transformer, src: Tensor, steps: int) -> tuple[Tensor, float]:
    """``steps`` greedy tokens per row the way :func:`greedy_search` computes them: ``((rows, steps), seconds)``."""
    mask = padding_mask(src, model.cfg.pad_id)
    start = time.perf_counter()
    cache = model.new_cache(capacity=steps)
    cache.fill_cross_attention(model.decoder, model.encode(src, mask))
    last = torch.full((src.size(0),), model.cfg.decoder_start_id, dtype=torch.long)
    out = []
    for _ in range(steps):
        last = most_probable(model.project(model.decode_step(last, cache, None if bool(mask.all()) else mask)))
        out.append(last)
    return torch.stack(out, 1), time.perf_counter() - start


def static_greedy(step, model: Transformer, src: Tensor, steps: int) -> tuple[Tensor, float]:
    """The same with ``step`` (:func:`static_step`, compiled or not)."""
    mask = padding_mask(src, model.cfg.pad_id)
    start = time.perf_counter()
    memory = model.encode(src, mask)
    layers, rows, heads = len(model.decoder.layers), src.size(0), model.cfg.heads
    kv = [layer.cross_attn.project_keys_values(memory) for layer in model.decoder.layers]
    cross_k, cross_v = torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])
    self_k = torch.zeros(layers, rows, heads, steps, model.cfg.d_model // heads)
    self_v = torch.zeros_like(self_k)
    last = torch.full((rows,), model.cfg.decoder_start_id, dtype=torch.long)
    src_mask = None if bool(mask.all()) else mask
    out = []
    for t in range(steps):
        last = step(model, last, torch.tensor(t), self_k, self_v, cross_k, cross_v, src_mask)
        out.append(last)
    return torch.stack(out, 1), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compiled-step.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor
    inductor.freezing = True  # weights are constants: inductor packs them for oneDNN once
    inductor.cpp_wrapper = True  # the kernels are called from C++, not from Python

    c = CONFIGS["small"]
    cfg = ModelConfig(src_vocab_size=c["vocab"], tgt_vocab_size=c["vocab"], max_len=256, dropout=0.0, d_model=c["d"],
                      heads=c["heads"], ff=c["ff"], encoder_layers=c["layers"], decoder_layers=c["layers"])
    model = build_model(cfg, seed=0).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    packed = prepare_for_cpu(model)  # what encdec.load gives greedy search
    for layer in model.decoder.layers:
        layer.cross_attn.split_projections()
    generator = torch.Generator().manual_seed(1)
    lines = []
    for rows in args.rows:
        src = torch.randint(4, c["vocab"], (rows, 30), generator=generator)
        with torch.no_grad():
            reference, _ = eager_greedy(packed, src, args.steps)
            compiled = torch.compile(static_step, fullgraph=True, dynamic=False)
            start = time.perf_counter()
            static_greedy(compiled, model, src, args.steps)
            compile_s = time.perf_counter() - start
            times: dict[str, list[float]] = {"eager": [], "static": [], "compiled": []}
            same: dict[str, int] = {}
            for _ in range(args.rounds):
                for name, run in (("eager", lambda: eager_greedy(packed, src, args.steps)),
                                  ("static", lambda: static_greedy(static_step, model, src, args.steps)),
                                  ("compiled", lambda: static_greedy(compiled, model, src, args.steps))):
                    tokens, seconds = run()
                    times[name].append(seconds)
                    same[name] = int((tokens == reference).sum())
        best = {name: min(t) * 1000 / args.steps for name, t in times.items()}
        for name in times:
            compile_time = f"{compile_s:.0f} s" if name == "compiled" else ""
            lines.append(f"| {rows} | {name} | {best[name]:.3f} | {best['eager'] / best[name]:.2f}x | "
                         f"{same[name]}/{rows * args.steps} | {compile_time} |")
        print("\n".join(lines[-3:]), flush=True)
    text = f"""# Compiled decoding step (probe)

`python benchmarks/compiled_step.py --rows {' '.join(map(str, args.rows))} --steps {args.steps} --threads {args.threads}` on {time.strftime('%Y-%m-%d %H:%M')}

- CPU: {platform.processor() or platform.machine()}, {args.threads} thread(s); torch {torch.__version__}
- Small model (d_model 256, 4 heads, ff 1024, 3+3 layers, vocabulary 8000), random weights; {args.steps} greedy
  steps per row from a random 30-token source, no early end; best of {args.rounds} rounds, encoder included.
- eager: encdec's greedy step now; static: fixed-size caches (`static_step`), eager; compiled: static through
  `torch.compile` (inductor, freezing, C++ wrapper). Same tokens: against eager's.

| rows | mode | ms / step | speed-up over eager | same tokens | compile time |
|---|---|---|---|---|---|
{chr(10).join(lines)}
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
