"""Training: from a :class:`RunConfig` and a run folder to checkpoints and a best model.

Run folder layout (everything of one run lives in it)::

    config.yaml                 the resolved config
    src.tokenizer tgt.tokenizer trained once, reused on resume
    data/train/                 binarized training pairs (memory-mapped)
    checkpoints/step-000N/      model folder + trainer state, the last few kept
    best/                       model folder of the best validation so far
    log.jsonl                   one JSON object per validation

Only rank 0 writes; every rank trains on its shard of each global batch.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import distributed, mkl
from .allocator import reuse_freed_memory
from .attention import padding_mask
from .checkpoint import (atomic_folder, load_model_folder, load_trainer_state, save_model_folder,
                         save_trainer_state)
from .config import RunConfig, TokenizerConfig, check_resumable, to_dict
from .data import Batch, BatchIterator, BinarizedCorpus, collate, read_pairs
from .linear import bound_onednn_caches
from .loss import linear_cross_entropy
from .metrics import evaluate_all, exact_match
from .model import Transformer, build_model
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, load_tokenizer, train_tokenizer
from .translator import Translator


def inverse_sqrt_lr(step: int, peak: float, warmup: int) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then ``peak * sqrt(warmup / step)`` (the paper's schedule)."""
    step = max(step, 1)
    return peak * min(step / max(warmup, 1), math.sqrt(max(warmup, 1) / step))


def learning_rate(schedule: str, step: int, peak: float, warmup: int, progress: float) -> float:
    """The learning rate of optimizer step ``step`` (1-based).

    ``progress`` in [0, 1] is how much of the budget is spent (steps or training time);
    ``cosine`` and ``linear`` warm up linearly, then reach 0 when ``progress`` reaches 1;
    their decay spans the whole budget, warmup included (a time budget's warmup share is not
    known in advance), so with a 10% warmup the top is 0.98 (cosine) or 0.9 (linear) of ``peak``.
    """
    if schedule == "inverse_sqrt":
        return inverse_sqrt_lr(step, peak, warmup)
    ramp = min(max(step, 1) / max(warmup, 1), 1.0)
    left = 1.0 - min(max(progress, 0.0), 1.0)
    shape = left if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * (1.0 - left)))
    return peak * ramp * shape


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: Ampere+ GPUs, CPUs with AMX or AVX512-BF16.

    There, bf16 autocast trains several times faster (AMX: 8x the float32 matmul rate); elsewhere
    it is emulated and slower than float32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


class TranslationLoss(nn.Module):
    """Label-smoothed cross-entropy summed over real (non-pad) target tokens.

    The output layer only sees real positions, so padding costs no projection
    onto the vocabulary; projection and loss are fused (:mod:`encdec.loss`).
    Wrapping the model in a module gives DDP one forward.
    """

    def __init__(self, model: Transformer, label_smoothing: float) -> None:
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor) -> torch.Tensor:
        src_mask = padding_mask(src, self.model.cfg.pad_id)
        hidden = self.model.decode(tgt_in, self.model.encode(src, src_mask), src_mask)
        real = tgt_out != self.model.cfg.pad_id
        output = self.model.output
        return linear_cross_entropy(hidden[real], output.weight, output.bias, tgt_out[real], self.label_smoothing)


def _tokenizer_lines(pairs_spec, side: str):
    for src, tgt in read_pairs(pairs_spec):
        if side in ("src", "both"):
            yield src
        if side in ("tgt", "both"):
            yield tgt


def _train_tokenizer(cfg: TokenizerConfig, lines, path: Path) -> Tokenizer:
    if cfg.kind == "sentencepiece":
        options = dict(vocab_size=cfg.vocab_size, model_type=cfg.model_type, character_coverage=cfg.character_coverage)
    else:
        options = dict(min_count=cfg.min_count, case=cfg.case)
    return train_tokenizer(cfg.kind, lines, path, **options)


def prepare(cfg: RunConfig, run_dir: Path, log=print) -> tuple[Tokenizer, Tokenizer, BinarizedCorpus]:
    """Train the tokenizers and binarize the training data, once; later calls reuse them."""
    run_dir.mkdir(parents=True, exist_ok=True)
    data = cfg.data
    src_path, tgt_path = run_dir / "src.tokenizer", run_dir / "tgt.tokenizer"
    if not (src_path.exists() and tgt_path.exists()):
        # Stops at the first pair with text on both sides; without one, tokenizer training would
        # fail with the tokenizer library's own message.
        if not any(src.strip() and tgt.strip() for src, tgt in read_pairs(data.train)):
            files = data.train if isinstance(data.train, str) else " and ".join(map(str, data.train))
            raise ValueError(f"data.train: no pair with text on both sides in {files}; "
                             "check the files are non-empty and aligned")
        if data.shared_vocab:
            tok = _train_tokenizer(data.src_tokenizer, _tokenizer_lines(data.train, "both"), src_path)
            tok.save(tgt_path)
        else:
            _train_tokenizer(data.src_tokenizer, _tokenizer_lines(data.train, "src"), src_path)
            _train_tokenizer(data.tgt_tokenizer or data.src_tokenizer, _tokenizer_lines(data.train, "tgt"), tgt_path)
    src_tok, tgt_tok = load_tokenizer(src_path), load_tokenizer(tgt_path)
    corpus_dir = run_dir / "data" / "train"
    try:
        corpus = BinarizedCorpus.load(corpus_dir)
    except FileNotFoundError:
        corpus = BinarizedCorpus.build(read_pairs(data.train), src_tok, tgt_tok, corpus_dir, data.max_len)
    log(f"training pairs: {len(corpus)} kept, {corpus.n_dropped} dropped as longer than max_len={data.max_len}, "
        f"{corpus.n_empty} dropped with an empty side; vocabularies {src_tok.vocab_size}/{tgt_tok.vocab_size}")
    return src_tok, tgt_tok, corpus


@dataclass
class DevSet:
    """Validation pairs that fit the model; references grouped by source for multi-reference metrics."""

    batches: list[Batch]
    sources: list[str]
    references: list[list[str]]

    @classmethod
    def build(cls, spec, src_tok: Tokenizer, tgt_tok: Tokenizer, max_len: int, max_tokens: int) -> DevSet:
        pairs, grouped = [], {}
        for src, tgt in read_pairs(spec):
            ids = (src_tok.encode(src), tgt_tok.encode(tgt))
            if 0 < len(ids[0]) < max_len and 0 < len(ids[1]) < max_len:
                pairs.append(ids)
                grouped.setdefault(src, []).append(tgt)
        if not pairs:
            raise ValueError(f"data.dev: no usable pair in {spec}; check the files are non-empty and aligned")
        pairs.sort(key=lambda p: max(len(p[0]), len(p[1])))
        batches, start = [], 0
        while start < len(pairs):
            end = start + 1
            while end < len(pairs) and (end - start + 1) * (max(map(len, pairs[end])) + 1) <= max_tokens:
                end += 1
            batches.append(collate(pairs[start:end], PAD_ID, BOS_ID, EOS_ID))
            start = end
        return cls(batches, list(grouped), list(grouped.values()))


def prepare_training_process() -> None:
    """What a training process does before its first matrix product: bound oneDNN's caches (memory
    would grow with each new batch shape) and keep glibc's freed large blocks (a step's large tensors
    come back without page faults)."""
    bound_onednn_caches()
    reuse_freed_memory()


class Trainer:
    """Owns the model, optimizer, data stream and run folder of one training run."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, ctx: distributed.Context | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        tc = cfg.train
        self.ctx = ctx or distributed.setup(tc.device)
        prepare_training_process()
        torch.set_num_threads(tc.threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        log = self.log if self.ctx.is_main else (lambda *a: None)
        if self.ctx.is_main:
            for key, (before, now) in check_resumable(cfg, self.run_dir / "config.yaml").items():
                log(f"continuing {self.run_dir} with {key}: {before!r} -> {now!r}")
            self.src_tok, self.tgt_tok, _ = prepare(cfg, self.run_dir, log)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
        self.ctx.wait_for_main()  # rank 0 may take long; a training collective's timeout would cut it short
        if not self.ctx.is_main:
            self.src_tok, self.tgt_tok, _ = prepare(cfg, self.run_dir, log)
        self.corpus = BinarizedCorpus.load(self.run_dir / "data" / "train")
        model_cfg = cfg.model_config(self.src_tok.vocab_size, self.tgt_tok.vocab_size)
        self.model = build_model(model_cfg, seed=tc.seed).to(self.ctx.device)
        self.loss = TranslationLoss(self.model, tc.label_smoothing)
        self.bf16 = tc.precision == "bf16" or (tc.precision == "auto" and bf16_is_native(self.ctx.device))
        log(f"precision: {'bf16 autocast' if self.bf16 else 'float32'} ({tc.precision}) on {self.ctx.device}")
        if self.ctx.device.type == "cpu":
            log(mkl.status())  # off because torch came first: worth knowing (it costs ~15 % on AMD)
        # Fused: one kernel for all parameters instead of ~10 passes each (base model on 2 CPU
        # threads: 423 -> 48 ms a step, the same updates to 3e-8; HF's Trainer defaults to it too).
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps,
                                          weight_decay=tc.weight_decay,
                                          fused=self.ctx.device.type in ("cpu", "cuda"))
        self.batches = BatchIterator(self.corpus, tc.max_tokens, tc.seed, self.ctx.rank, self.ctx.world_size)
        self.step, self.best, self.bad_validations, self.elapsed = 0, None, 0, 0.0
        self.dev = DevSet.build(cfg.data.dev, self.src_tok, self.tgt_tok, model_cfg.max_len, tc.max_tokens)
        last = self.last_checkpoint()
        if last is not None:
            self._resume(last)
        self.ctx.check_same(self.step, "the step to resume from")
        if self.ctx.distributed:
            # The only buffer (the sinusoid table) never changes: no need to re-send it every step.
            self.loss = DistributedDataParallel(self.loss, broadcast_buffers=False,
                                                device_ids=[self.ctx.device] if self.ctx.device.type == "cuda" else None)

    # --- run folder -------------------------------------------------------------------------

    def log(self, message: str) -> None:
        tqdm.write(message)
        sys.stdout.flush()  # logs redirected to files show up as they happen

    def last_checkpoint(self) -> Path | None:
        folders = sorted((self.run_dir / "checkpoints").glob("step-*[0-9]"))
        return folders[-1] if folders else None

    def _resume(self, folder: Path) -> None:
        model, *_ = load_model_folder(folder)
        self.model.load_state_dict(model.state_dict())
        state = load_trainer_state(folder, self.optimizer)
        self.step, self.best = state["step"], state["best"]
        self.bad_validations, self.elapsed = state["bad_validations"], state["elapsed"]
        self.batches.load_state_dict(state["data"])
        if self.ctx.is_main:
            self.log(f"resumed from {folder} at step {self.step}")

    def save_checkpoint(self, is_best: bool) -> None:
        """Write ``checkpoints/step-N`` (and ``best``) atomically; prune old step checkpoints."""
        if not self.ctx.is_main:
            return
        folder = self.run_dir / "checkpoints" / f"step-{self.step:08d}"
        state = {"step": self.step, "best": self.best, "bad_validations": self.bad_validations,
                 "elapsed": self.elapsed, "data": self.batches.state_dict()}
        with atomic_folder(folder) as tmp:
            save_model_folder(tmp, self.model, self.src_tok, self.tgt_tok, {"step": self.step})
            save_trainer_state(tmp, self.optimizer, state)
        if is_best:
            with atomic_folder(self.run_dir / "best") as tmp:
                save_model_folder(tmp, self.model, self.src_tok, self.tgt_tok, {"step": self.step})
        for old in sorted((self.run_dir / "checkpoints").glob("step-*[0-9]"))[: -self.cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    # --- validation -------------------------------------------------------------------------

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Dev loss/perplexity and the task metrics of decoding the dev sources."""
        self.model.eval()
        loss_sum = tokens = 0.0
        for batch in self.dev.batches:
            batch = batch.to(self.ctx.device)
            loss_sum += TranslationLoss(self.model, 0.0)(batch.src, batch.tgt_in, batch.tgt_out).item()
            tokens += batch.n_tgt_tokens
        result = {"dev_loss": loss_sum / tokens, "dev_ppl": math.exp(min(loss_sum / tokens, 50))}
        if self.cfg.train.metric != "loss":
            translator = Translator(self.model, self.src_tok, self.tgt_tok)
            hyps = translator.translate(self.dev.sources, beam=self.cfg.train.beam, on_unknown="ignore")
            kind = "symbols" if self.cfg.train.metric in ("wer", "per") else "text"
            result.update(evaluate_all(hyps, self.dev.references, kind=kind))
            result["exact"] = exact_match(hyps, self.dev.references)
        self.model.train()
        return result

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.cfg.train.higher_is_better else value < self.best

    # --- the loop ---------------------------------------------------------------------------

    def _micro_step(self, batch: Batch, sync: bool) -> float:
        batch = batch.to(self.ctx.device)
        no_sync = self.loss.no_sync if isinstance(self.loss, DistributedDataParallel) and not sync else contextlib.nullcontext
        autocast = torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        with no_sync(), autocast:
            loss = self.loss(batch.src, batch.tgt_in, batch.tgt_out)
            loss.backward()
        return loss.item()

    def _optimizer_step(self, local_tokens: int) -> None:
        tc = self.cfg.train
        # Gradients hold sums over tokens (DDP averages them over ranks): make them a mean over the global batch.
        scale = self.ctx.world_size / max(self.ctx.sum(local_tokens), 1.0)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        if tc.clip_norm > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_norm)
        self.step += 1
        progress = self.progress() if tc.schedule != "inverse_sqrt" else 0.0
        lr = learning_rate(tc.schedule, self.step, tc.lr, tc.warmup, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def progress(self) -> float:
        """How much of the budget is spent, in [0, 1]: the larger of the step and time fractions.

        Steps count from 0 before this step; the clock is rank 0's, so every rank agrees.
        """
        tc = self.cfg.train
        fraction = (self.step - 1) / tc.max_steps
        if tc.max_minutes:
            fraction = max(fraction, self.ctx.broadcast(float(self.elapsed)) / (tc.max_minutes * 60))
        return min(fraction, 1.0)

    def _should_stop(self) -> str | None:
        """Why to stop now, decided by rank 0 (whose clock and validations count) for every rank."""
        reason = self._stop_reason() if self.ctx.is_main else None
        if self.ctx.broadcast(reason is not None):
            return reason or "rank 0 stopped"
        return None

    def _stop_reason(self) -> str | None:
        tc = self.cfg.train
        if self.step >= tc.max_steps:
            return f"reached max_steps={tc.max_steps}"
        if tc.max_epochs and self.batches.epoch >= tc.max_epochs:
            return f"reached max_epochs={tc.max_epochs}"
        if tc.max_minutes and self.elapsed >= tc.max_minutes * 60:
            return f"reached max_minutes={tc.max_minutes}"
        if tc.patience and self.bad_validations >= tc.patience:
            return f"no improvement in {tc.patience} validations (early stopping)"
        return None

    def train(self) -> dict | None:
        """Train until a stop condition; returns the last validation (on rank 0)."""
        tc = self.cfg.train
        self.model.train()
        stream = iter(self.batches)
        # The bar goes to terminals only; logs get the validation lines.
        bar = tqdm(total=tc.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.ctx.is_main and sys.stderr.isatty()))
        window_loss = window_tokens = 0.0
        window_start, last_result = time.perf_counter(), None
        reason = self._should_stop()
        while reason is None:
            started = time.perf_counter()
            tokens = 0
            distributed.seed_step(tc.seed, self.step, self.ctx.rank)  # distinct per rank, exact on resume
            for micro in range(tc.accumulate):
                batch = next(stream)
                window_loss += self._micro_step(batch, sync=micro == tc.accumulate - 1)
                tokens += batch.n_tgt_tokens
            self._optimizer_step(tokens)
            window_tokens += tokens
            self.elapsed += time.perf_counter() - started
            bar.update(1)
            if self.step % tc.log_every == 0:
                rate = window_tokens * self.ctx.world_size / max(time.perf_counter() - window_start, 1e-9)
                loss = window_loss / max(window_tokens, 1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}")
                if bar.disable and self.ctx.is_main:  # no terminal: a plain line instead of the bar
                    self.log(f"step {self.step}/{tc.max_steps} loss {loss:.3f} {rate:.0f} tok/s "
                             f"{self.elapsed / 60:.1f} min")
            reason = self._should_stop()
            if self.step % tc.validate_every == 0 or reason is not None:
                last_result = self._validate_and_save(window_loss / max(window_tokens, 1), window_tokens, window_start)
                window_loss = window_tokens = 0.0
                window_start = time.perf_counter()
                reason = reason or self._should_stop()  # early stopping is decided by the validation
        bar.close()
        if self.ctx.is_main:
            self.log(f"stopped at step {self.step}: {reason}; best {tc.metric} {self.best}")
        return last_result

    def _validate_and_save(self, train_loss: float, window_tokens: float, window_start: float) -> dict | None:
        result = None
        if self.ctx.is_main:
            seconds = time.perf_counter() - window_start
            result = {"step": self.step, "epoch": self.batches.epoch, "train_loss": train_loss,
                      "lr": self.optimizer.param_groups[0]["lr"],
                      "train_tokens_per_s": window_tokens * self.ctx.world_size / max(seconds, 1e-9)}
            result.update(self.validate())
            result["elapsed_s"] = self.elapsed
            value = result["dev_loss" if self.cfg.train.metric == "loss" else self.cfg.train.metric]
            improved = self._improved(value)
            if improved:
                self.best, self.bad_validations = value, 0
            else:
                self.bad_validations += 1
            with open(self.run_dir / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
            self.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
            self.save_checkpoint(improved)
        self.ctx.wait_for_main()
        return result


def train(cfg: RunConfig, run_dir: str | Path) -> dict | None:
    """Train (or resume) the run in ``run_dir``; returns the last validation result."""
    ctx = distributed.setup(cfg.train.device)
    try:
        with distributed.explain_failures(ctx):
            return Trainer(cfg, run_dir, ctx).train()
    finally:
        distributed.teardown()
