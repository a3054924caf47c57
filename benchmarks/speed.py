"""Training and decoding speed of encdec against plain PyTorch, Hugging Face and CTranslate2 on CPU.

    python benchmarks/speed.py                  # small and base, training and decoding (<= 15 min)
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

THREADS = int(os.environ.get("SPEED_THREADS", 2))  # set by --threads; workers inherit it
CONFIGS = {  # d_model, heads, ff, layers (each side), shared vocabulary
    "small": dict(d=256, heads=4, ff=1024, layers=3, vocab=8000),
    "base": dict(d=512, heads=8, ff=2048, layers=6, vocab=32000),
}
MAX_TOKENS = 4096  # per training batch, padding included
SMOOTHING = 0.1
MAX_NEW = 48  # decoding limit for every system: about 1.5 x the ~30-token sources
RESULT = "RESULT "  # prefix of the one stdout line a worker answers with


# --- synthetic data ---------------------------------------------------------------------------

def zipf_ids(rng: np.random.Generator, n: int, low: int, high: int) -> np.ndarray:
    """``n`` token ids in ``[low, high)`` with Zipf-like frequencies (id ``low`` the most frequent)."""
    p = np.arange(1, high - low + 1, dtype=np.float64) ** -1.1
    return rng.choice(np.arange(low, high), size=n, p=p / p.sum())


def make_pairs(n: int, low: int, high: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sentence pairs of 5-60 tokens: log-normal source lengths (median ~20, like news text),
    targets within about +-20% of their source, as between related languages."""
    rng = np.random.default_rng(seed)
    src_len = np.clip(np.round(rng.lognormal(np.log(20), 0.5, n)), 5, 60).astype(int)
    tgt_len = np.clip(np.round(src_len * rng.lognormal(0, 0.15, n)), 5, 60).astype(int)
    return [(zipf_ids(rng, s, low, high), zipf_ids(rng, t, low, high)) for s, t in zip(src_len, tgt_len)]


def random_batches(pairs, max_tokens: int, seed: int = 0) -> list[np.ndarray]:
    """How a plain PyTorch user batches: shuffled, a fixed number of sentences per batch, that number
    chosen so that a batch's padded size, sentences x longest side (+1 for BOS/EOS), is ~max_tokens."""
    rng = np.random.default_rng(seed)
    longest = np.array([max(len(s), len(t)) + 1 for s, t in pairs])
    size = 1
    while np.mean([(size + 1) * rng.choice(longest, size + 1).max() for _ in range(50)]) <= max_tokens:
        size += 1
    order = rng.permutation(len(pairs))
    return [order[i:i + size] for i in range(0, len(order) - size + 1, size)]


def decode_sources(vocab: int, n: int = 32, seed: int = 1) -> list[list[int]]:
    """``n`` Marian sources of 25-35 tokens ending in the end token (id 0); 1 is <unk>, vocab-1 is <pad>."""
    rng = np.random.default_rng(seed)
    return [[*map(int, zipf_ids(rng, int(rng.integers(24, 35)), 2, vocab - 1)), 0] for _ in range(n)]


def pad_rows(rows: list[list[int]], pad: int):
    import torch
    out = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row)
    return out


# --- workers (each runs in its own process) ---------------------------------------------------

def worker_peak(spec: dict) -> dict:
    """Matmul GFLOP/s in ``spec["dtype"]`` (float32 or bfloat16): the best of a few large square
    products (the MFU denominator)."""
    import torch
    torch.set_num_threads(THREADS)
    best, dtype = 0.0, getattr(torch, spec.get("dtype", "float32"))
    for n in spec["sizes"]:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # first call allocates and warms the BLAS thread pool
        for _ in range(spec["repeats"]):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return {"gflops": best, "torch": torch.__version__}


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


def marian_config(c: dict, **options):
    import transformers
    return transformers.MarianConfig(
        vocab_size=c["vocab"], d_model=c["d"], encoder_layers=c["layers"], decoder_layers=c["layers"],
        encoder_attention_heads=c["heads"], decoder_attention_heads=c["heads"], encoder_ffn_dim=c["ff"],
        decoder_ffn_dim=c["ff"], max_position_embeddings=512, scale_embedding=True, **options)


def train_system(name: str, c: dict, pairs, ranks: int = 1):
    """(model, batches, step) for one system; ``step(indices)`` trains on a batch and returns
    (real target tokens, padded target positions).

    ``ranks > 1`` (encdec only, inside an initialised process group): what ``torchrun -m encdec --
    train`` does. Each rank takes every ``ranks``-th sentence of the global batch, DDP averages the
    gradients, and the loss is normalised by the real tokens of the whole global batch.
    """
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from encdec.data import collate
    if ranks > 1 and name != "encdec":
        raise ValueError(f"{name}: only encdec is measured in several processes")
    name, bf16 = name.removesuffix("-bf16"), name.endswith("-bf16")  # -bf16: the same step under bf16 autocast
    pad, bos, eos = 0, 1, 2
    rank = dist.get_rank() if ranks > 1 else 0
    batch = lambda idx: collate([pairs[i] for i in idx[rank::ranks]], pad, bos, eos)  # noqa: E731
    if name == "encdec":
        from encdec import ModelConfig, build_model
        from encdec.data import token_batches
        from encdec.train import TranslationLoss
        model = build_model(ModelConfig(c["vocab"], c["vocab"], c["d"], c["heads"], c["ff"], c["layers"], c["layers"],
                                        share_embeddings=True, tie_output=True), seed=1)
        loss_fn = TranslationLoss(model, SMOOTHING)
        if ranks > 1:
            loss_fn = torch.nn.parallel.DistributedDataParallel(loss_fn, broadcast_buffers=False)
        lengths = [np.array([len(p[k]) + 1 for p in pairs]) for k in (0, 1)]  # + EOS / BOS, as collate adds
        batches = token_batches(*lengths, MAX_TOKENS, seed=1, epoch=0)

        def loss_of(b):  # the trainer's normalisation: summed loss over real tokens / their count
            return loss_fn(b.src, b.tgt_in, b.tgt_out) * ranks / global_sum(b.n_tgt_tokens)
    elif name == "torch":
        from encdec.embeddings import sinusoids
        torch.manual_seed(1)
        model = torch.nn.ModuleDict(dict(
            embed=torch.nn.Embedding(c["vocab"], c["d"], padding_idx=pad),
            transformer=torch.nn.Transformer(c["d"], c["heads"], c["layers"], c["layers"], c["ff"], 0.1,
                                             batch_first=True),
            out=torch.nn.Linear(c["d"], c["vocab"])))
        model.out.weight = model.embed.weight
        table, scale = sinusoids(512, c["d"]), c["d"] ** 0.5
        batches = random_batches(pairs, MAX_TOKENS)

        def loss_of(b):
            embed = lambda ids: model.embed(ids) * scale + table[:ids.size(1)]  # noqa: E731
            t = b.tgt_in.size(1)
            causal = torch.ones(t, t, dtype=torch.bool).triu(1)  # bool like the padding masks: no mixing warning
            hidden = model.transformer(embed(b.src), embed(b.tgt_in), tgt_mask=causal, tgt_is_causal=True,
                                       src_key_padding_mask=b.src == pad, tgt_key_padding_mask=b.tgt_in == pad,
                                       memory_key_padding_mask=b.src == pad)
            logits = model.out(hidden)  # every position, pads included: the plain way
            return F.cross_entropy(logits.flatten(0, 1), b.tgt_out.flatten(), ignore_index=pad,
                                   label_smoothing=SMOOTHING)
    elif name == "hf":
        import transformers
        torch.manual_seed(1)
        model = transformers.MarianMTModel(marian_config(c, pad_token_id=pad, eos_token_id=eos,
                                                         decoder_start_token_id=pad, activation_function="relu"))
        batches = random_batches(pairs, MAX_TOKENS)

        def loss_of(b):  # HF shifts the labels right (starting from <pad>) to get the decoder input
            return model(input_ids=b.src, attention_mask=(b.src != pad).long(),
                         labels=b.tgt_out.masked_fill(b.tgt_out == pad, -100)).loss
    else:
        raise ValueError(name)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)

    def step(idx):
        b = batch(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(b)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return global_sum(b.n_tgt_tokens), global_sum(b.tgt_out.numel())

    def global_sum(x: float) -> float:  # over the ranks (as encdec's trainer counts a global batch's tokens)
        if ranks == 1:
            return x
        total = torch.tensor([float(x)])
        dist.all_reduce(total)
        return float(total)
    return model, batches, step


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


def ct2_tokens(vocab: int) -> list[str]:
    """Marian's id layout as strings: </s>=0, <unk>=1, <pad> last; CTranslate2 works on token strings."""
    return ["</s>", "<unk>", *(f"t{i}" for i in range(2, vocab - 1)), "<pad>"]


def fit_end_token(hf, folder: Path, c: dict) -> dict:
    """Give a random Marian model's end token a learned output row so outputs stop near source length.

    A random model's end-token logit is noise: with a bias tuned for greedy lengths, beam search
    still finds an early end within a few steps. So, with the end token banned (its row zero, bias
    -1e4), decode greedily, add off-path prefixes of random tokens (like the candidates beam search
    explores), and fit the end token's row and bias by ridge regression to the best other logit
    + 2 x (steps past the source length, clipped to +-3): below it before, above after.
    """
    import torch
    from encdec.attention import padding_mask
    from encdec.marian import load_marian
    from encdec.search import greedy_search
    pad, eos, rng = c["vocab"] - 1, 0, np.random.default_rng(2)
    hf.save_pretrained(folder)
    model = load_marian(folder)  # encdec for the forward passes: same logits, and much faster than generate
    sources = decode_sources(c["vocab"]) + decode_sources(c["vocab"], seed=2)
    targets = greedy_search(model, pad_rows(sources, pad), max_len_ratio=0.0, max_len_extra=MAX_NEW + 1)
    targets += [list(zipf_ids(rng, MAX_NEW, 2, c["vocab"] - 1)) for _ in sources]
    features, goals = [], []
    with torch.inference_mode():
        for i in range(0, len(targets), 32):  # chunks: the logits of 32 x MAX_NEW positions stay < 200 MB
            src, tgt = (sources * 2)[i:i + 32], torch.tensor(targets[i:i + 32])  # all MAX_NEW long
            ids, mask = pad_rows(src, pad), padding_mask(pad_rows(src, pad), pad)
            prefix = torch.cat([torch.full((len(tgt), 1), pad), tgt[:, :-1]], 1)
            hidden = model.decode(prefix, model.encode(ids, mask), mask)
            best_other = model.project(hidden).index_fill(2, torch.tensor([eos]), -1e9).max(2).values
            past = torch.arange(MAX_NEW)[None] - torch.tensor([len(s) - 1 for s in src])[:, None] + 0.5
            features.append(hidden.flatten(0, 1))
            goals.append((best_other + 2.0 * past.clamp(-3, 3)).flatten())
        x = torch.cat([torch.cat(features), torch.ones(sum(map(len, features)), 1)], 1)
        y = torch.cat(goals)
        w = torch.linalg.solve(x.T @ x + torch.eye(x.size(1)), x.T @ y)  # ridge 1: keeps off-path logits tame
        hf.lm_head.weight[eos] = w[:-1]
        hf.final_logits_bias[0, eos] = w[-1]
    return {"fit_rmse": float((x @ w - y).pow(2).mean().sqrt())}


def worker_prepare(spec: dict) -> dict:
    """A random ``MarianMTModel`` saved to ``dir/hf``, converted to ``dir/ct2-float32`` and ``dir/ct2-int8``.

    A random model is degenerate unless (found by trying) its weights' std is ~0.75/sqrt(d_model) and
    the output layer is tied to nothing: larger weights or a tied output layer repeat one token forever.
    (transformers 5 unties the encoder and decoder embeddings too when tie_word_embeddings is false,
    so they are declared unshared.)
    """
    import ctranslate2
    import torch
    import transformers
    torch.set_num_threads(THREADS)
    c, out = CONFIGS[spec["config"]], Path(spec["dir"])
    pad, eos = c["vocab"] - 1, 0
    torch.manual_seed(0)
    hf = transformers.MarianMTModel(marian_config(
        c, pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad, forced_eos_token_id=None,
        activation_function="swish", init_std=0.75 / c["d"] ** 0.5, share_encoder_decoder_embeddings=False,
        tie_word_embeddings=False)).eval()
    with torch.no_grad():
        # CTranslate2 starts Marian's decoder from a zero vector: the <pad> embedding must be zero.
        assert not hf.get_decoder().embed_tokens.weight[pad].any()
        bias = hf.final_logits_bias[0]
        bias.normal_(std=0.1)  # non-zero, so the bias path is exercised (converters skip a zero bias)
        bias[pad] = -100.0  # never generated (CTranslate2 drops <pad> from the vocabulary)
        bias[eos] = -1e4
        hf.lm_head.weight[eos] = 0.0
    fit = fit_end_token(hf, out / "hf", c)
    hf.save_pretrained(out / "hf")

    class Vocabulary:  # all the converter reads from a tokenizer; this folder has none to load
        eos_token, unk_token = "</s>", "<unk>"

        def get_vocab(self):
            return {t: i for i, t in enumerate(ct2_tokens(c["vocab"]))}

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_tokenizer(self, *args, **kwargs):
            return Vocabulary()
    for quantization in ("float32", "int8"):
        Converter(str(out / "hf")).convert(str(out / f"ct2-{quantization}"), quantization=quantization)
    return fit


def decoder(system: str, c: dict, folder: Path):
    """``run(sources, beam) -> token ids per sentence`` (no start/end token) for one system."""
    import torch
    pad, eos = c["vocab"] - 1, 0
    if system in ("encdec", "encdec-int8", "encdec-bf16"):
        from encdec.marian import load_marian
        from encdec.inference import prepare_for_cpu
        from encdec.search import beam_search, greedy_search
        # what encdec.load does on a CPU: packed float32 weights, or bf16, or int8
        model = prepare_for_cpu(load_marian(folder / "hf"), system.partition("-")[2] or "fp32", inplace=True)

        def run(src, beam):
            ids = pad_rows(src, pad)
            # ratio 0: a fixed limit, MAX_NEW tokens plus the end token, like max_new_tokens elsewhere
            if beam == 1:
                return greedy_search(model, ids, max_len_ratio=0.0, max_len_extra=MAX_NEW + 1)
            hyps = beam_search(model, ids, beam_size=beam, alpha=0.0, max_len_ratio=0.0, max_len_extra=MAX_NEW + 1)
            return [h[0].tokens for h in hyps]
    elif system == "hf":
        import transformers
        transformers.logging.set_verbosity_error()
        model = transformers.MarianMTModel.from_pretrained(folder / "hf").eval()

        def run(src, beam):
            ids = pad_rows(src, pad)
            with torch.inference_mode():
                # length_penalty 0 and early_stopping (stop at `beam` finished) are what encdec and ct2 do here
                gen = model.generate(input_ids=ids, attention_mask=(ids != pad).long(), num_beams=beam,
                                     do_sample=False, max_new_tokens=MAX_NEW, length_penalty=0.0,
                                     early_stopping=True, forced_eos_token_id=None)
            rows = [row[1:] for row in gen.tolist()]  # drop the start token
            return [row[:row.index(eos)] if eos in row else [t for t in row if t != pad] for row in rows]
    else:
        import ctranslate2
        kind = system.removeprefix("ct2-")
        model = ctranslate2.Translator(str(folder / system), device="cpu", compute_type=kind,
                                       intra_threads=THREADS, inter_threads=1)
        tokens = ct2_tokens(c["vocab"])
        index = {t: i for i, t in enumerate(tokens)}

        def run(src, beam):
            results = model.translate_batch([[tokens[i] for i in s] for s in src], beam_size=beam,
                                            max_decoding_length=MAX_NEW, min_decoding_length=0, length_penalty=0.0)
            return [[index[t] for t in r.hypotheses[0]] for r in results]
    return run


def worker_decode(spec: dict) -> dict:
    """Greedy and beam 5: the first ``n1`` sources one at a time, and the first ``batch`` (32) as one batch."""
    import torch
    torch.set_num_threads(THREADS)
    c = CONFIGS[spec["config"]]
    run = decoder(spec["system"], c, Path(spec["dir"]))
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
    out = ["| mode | system | tokens/s | latency | mean length | same tokens as encdec | encdec / system |",
           "|---|---|---|---|---|---|---|"]
    ours = rows["encdec"]
    for mode in [k for k in ours if k != "max_rss_mib"]:
        unit = "ms/sentence" if mode.endswith("b1") else "ms/batch"
        for name, r in rows.items():
            m = r[mode]
            same = sum(a == b for a, b in zip(m["outputs"], ours[mode]["outputs"]))
            out.append(f"| {mode} | {name} | {m['tokens_per_s']:.0f} | {m['ms']:.0f} {unit} | {m['mean_length']:.1f} "
                       f"| {same}/{len(m['outputs'])} | {ratio(ours[mode]['tokens_per_s'], m['tokens_per_s'])} |")
    return out


def target_table(rows: dict) -> list[str]:
    """The issue's decoding targets side by side: vs HF, and same precision vs CTranslate2; bf16
    (CTranslate2 has no bf16 on CPUs) against CTranslate2's faster of float32 and int8."""
    bf16 = "encdec-bf16" in rows
    out = ["| mode | encdec / hf | encdec / ct2-float32 | encdec-int8 / ct2-int8 |"
           + (" encdec-bf16 / fastest ct2 |" if bf16 else ""), "|---|---|---|---|" + ("---|" if bf16 else "")]
    for mode in [k for k in rows["encdec"] if k != "max_rss_mib"]:
        tps = {name: r[mode]["tokens_per_s"] for name, r in rows.items()}
        out.append(f"| {mode} | {ratio(tps['encdec'], tps['hf'])} | {ratio(tps['encdec'], tps['ct2-float32'])} | "
                   f"{ratio(tps['encdec-int8'], tps['ct2-int8'])} |"
                   + (f" {ratio(tps['encdec-bf16'], max(tps['ct2-float32'], tps['ct2-int8']))} |" if bf16 else ""))
    return out


def main() -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small config, few steps: a <= 3 minute smoke run")
    parser.add_argument("--only", choices=("train", "decode"), help="run one half only")
    parser.add_argument("--configs", default=None, help="comma-separated, from: " + ", ".join(CONFIGS))
    parser.add_argument("--threads", type=int, default=2, help="torch/CTranslate2 threads (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default benchmarks/results/speed[-quick])")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = globals()[f"worker_{args.worker[0]}"](json.loads(args.worker[1]))
        if os.environ.get("RANK", "0") == "0":
            print(RESULT + json.dumps(result), flush=True)
        return
    THREADS = args.threads
    os.environ["SPEED_THREADS"] = str(THREADS)  # for the workers
    configs = (args.configs or ("small" if args.quick else "small,base")).split(",")
    # --quick: fewer steps, and decoding batches of 8 (HF beam search on 32 sentences alone takes ~30 s)
    steps, warmup, budget, n1, nb = (4, 1, 20, 2, 8) if args.quick else (10, 2, 60, 8, 32)
    out = args.out or Path(__file__).parent / "results" / ("speed-quick" if args.quick else "speed")
    info = machine_info("python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"{info['cpu']}, {THREADS} threads; measuring matmul peak", file=sys.stderr)
    sizes = [2048] if args.quick else [2048, 3072]
    peak = in_subprocess("peak", {"sizes": sizes, "repeats": 5})["gflops"]
    # bf16 rows where the CPU multiplies bf16 in hardware (AMX / AVX512-BF16); emulated bf16 is slow
    from encdec.train import bf16_is_native
    import torch
    bf16 = bf16_is_native(torch.device("cpu"))
    peak_bf16 = in_subprocess("peak", {"sizes": sizes, "repeats": 5, "dtype": "bfloat16"})["gflops"] if bf16 else 0.0
    results: dict = {"machine": info, "peak_gflops": peak, "peak_bf16_gflops": peak_bf16, "train": {}, "decode": {}}
    lines = ["# encdec speed", "", f"`{info['command']}` on {info['date']}", "",
             f"- CPU: {info['cpu']} ({info['cores']} cores), {THREADS} threads everywhere; load average at start "
             f"{info['load_average_at_start']:.1f} (well above 0 means something else was running: PyTorch's "
             "thread pool then slows down many times over, so such numbers are not comparable)",
             f"- Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
             f"ctranslate2 {info['ctranslate2']}",
             f"- matmul peak: {peak:.0f} GFLOP/s in float32, "
             + (f"{peak_bf16:.0f} GFLOP/s in bf16" if bf16 else "no native bf16 (no bf16 rows)")
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
                      "`torch.autocast` bf16 (what `train.precision: bf16` and HF's `bf16=True` do). Adam. "
                      "tokens/s counts real (non-pad) "
                      f"target tokens; {warmup} warm-up steps, then up to {steps} steps or {budget} s.", "",
                      *train_table(rows, peak, peak_bf16), ""]
        if args.only != "train":
            print(f"decoding {name}", file=sys.stderr)
            with tempfile.TemporaryDirectory() as folder:
                prep = in_subprocess("prepare", {"config": name, "dir": folder})
                spec = {"config": name, "dir": folder, "n1": n1, "batch": nb}
                rows = {s: in_subprocess("decode", {**spec, "system": s})
                        for s in ("encdec", "hf", "ct2-float32", "encdec-int8", "ct2-int8")
                        + (("encdec-bf16",) if bf16 else ())}
            gb_per_s = in_subprocess("bandwidth", {"bytes": streamed_bytes(c), "repeats": 10})["gb_per_s"]
            results["decode"][name] = {"prepare": prep, "bandwidth_gb_s": gb_per_s, **rows}
            lines += [f"## Decoding, {title}", "",
                      f"One random MarianMTModel (end token fitted to stop near the source length, RMSE "
                      f"{prep['fit_rmse']:.2f}) loaded by each system; sources of 25-35 tokens; at most {MAX_NEW} new "
                      f"tokens; beam: length penalty 0, stop at 5 finished. b1: the first {n1} sources one by one; "
                      f"b{nb}: the first {nb} as one batch. tokens/s counts output tokens (no end token).", "",
                      *decode_table(rows), "", "Targets (tokens/s ratios; want >= 2 for HF, >= 1 for CTranslate2):", "",
                      *target_table(rows), "", *bound_lines(rows, c, gb_per_s)]
    info["load_average_at_end"] = os.getloadavg()[0]
    lines.append(f"Load average at the end: {info['load_average_at_end']:.1f}.")
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
