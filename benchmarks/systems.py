"""The systems ``speed.py`` measures, each set up the way its users would: encdec, PyTorch's
``nn.Transformer``, Hugging Face's ``MarianMTModel`` and CTranslate2 (converted from the same Marian weights).

``train_system`` gives one system's training step; ``build_decoding_models`` writes the shared random
Marian model and its CTranslate2 conversions; ``decoder`` loads one system's decoding function.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from workload import MAX_NEW, MAX_TOKENS, SMOOTHING, decode_sources, pad_rows, random_batches, zipf_ids


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
        from encdec.train import TranslationLoss, prepare_training_process
        prepare_training_process()  # what encdec's Trainer does first
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
    # Fused Adam for every system: encdec's trainer uses it, and HF's Trainer defaults to it.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=True)

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


def build_decoding_models(c: dict, out: Path) -> dict:
    """A random ``MarianMTModel`` saved to ``out/hf``, converted to ``out/ct2-float32`` and ``out/ct2-int8``;
    returns the end-token fit's RMSE.

    A random model is degenerate unless (found by trying) its weights' std is ~0.75/sqrt(d_model) and
    the output layer is tied to nothing: larger weights or a tied output layer repeat one token forever.
    (transformers 5 unties the encoder and decoder embeddings too when tie_word_embeddings is false,
    so they are declared unshared.)
    """
    import ctranslate2
    import torch
    import transformers
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


def decoder(system: str, c: dict, folder: Path, threads: int):
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
                                       intra_threads=threads, inter_threads=1)
        tokens = ct2_tokens(c["vocab"])
        index = {t: i for i, t in enumerate(tokens)}

        def run(src, beam):
            results = model.translate_batch([[tokens[i] for i in s] for s in src], beam_size=beam,
                                            max_decoding_length=MAX_NEW, min_decoding_length=0, length_penalty=0.0)
            return [[index[t] for t in r.hypotheses[0]] for r in results]
    return run
