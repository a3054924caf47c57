"""An HTTP server for a model folder (FastAPI + uvicorn): ``encdec serve --model runs/NAME/best``.

    POST /translate  {"texts": ["..."], "beam": 5, "alpha": 1.0, "n_best": 1}
                     -> {"translations": ["..."], "unknown_symbols": [...],
                         "n_best": [[{"text": "...", "score": -1.2}, ...], ...]   (only when n_best > 1)}
    GET  /health     -> {"status": "ok", "model": ..., "precision": ..., "max_input_tokens": ..., ...}
    GET  /docs       -> the interactive OpenAPI page

Requests that arrive together are decoded together. One worker thread owns the
model: it takes every queued request with the same decoding options (up to
``max_batch_sentences`` sentences, waiting at most ``max_wait_ms`` for more) and
decodes them as one batch, which is where the matrix products are efficient. Batched
decoding gives the same outputs as decoding one sentence at a time (tests/test_search.py),
so a request's answer does not depend on what else was in its batch. Bad requests
(empty, too many texts, an over-long text, n_best > beam) are answered with one line
in ``detail`` and never reach the model.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from .translator import InputError, Translator


class ShuttingDown(RuntimeError):
    """The server stopped before this request was decoded."""


@dataclass(frozen=True)
class DecodingOptions:
    """What must be equal for two requests to share a batch."""
    beam: int
    alpha: float
    n_best: int
    max_len_ratio: float


@dataclass
class _Job:
    ids: list[list[int]]
    options: DecodingOptions
    future: Future = field(default_factory=Future)


def _refuse(job: _Job) -> None:
    job.future.set_exception(ShuttingDown("the server is shutting down; send the request again"))


class Batcher:
    """Merges queued requests into decoding batches on one worker thread.

    ``submit(ids, options)`` returns a Future of the ``n_best`` (text, score) lists,
    one per sentence, as :meth:`Translator.translate_encoded` gives them.
    """

    def __init__(self, translator: Translator, max_batch_sentences: int = 64, max_wait_ms: float = 5.0,
                 batch_tokens: int = 8000) -> None:
        self.translator, self.max_sentences = translator, max_batch_sentences
        self.max_wait, self.batch_tokens = max_wait_ms / 1000, batch_tokens
        self.batches = 0  # decoding calls made: fewer than requests when requests were merged
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="encdec-batcher", daemon=True)
        self._stopped, self._lock = False, threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the batch in progress, refuse what is still queued, end the thread."""
        with self._lock:
            self._stopped = True
            self._queue.put(None)
        self._thread.join()

    def submit(self, ids: list[list[int]], options: DecodingOptions) -> Future:
        job = _Job(ids, options)
        with self._lock:  # so that no job lands behind the stop sentinel, where nobody would take it
            if self._stopped:
                _refuse(job)
            else:
                self._queue.put(job)
        return job.future

    def _run(self) -> None:
        held: deque[_Job] = deque()  # taken from the queue while gathering a batch of other options
        stopping = False
        while not stopping:
            first = held.popleft() if held else self._queue.get()
            if first is None:
                break
            batch, held, stopping = self._gather(first, held)
            self._decode(batch)
        for job in held:
            _refuse(job)
        while not self._queue.empty():
            job = self._queue.get()
            if job is not None:
                _refuse(job)

    def _gather(self, first: _Job, held: deque[_Job]) -> tuple[list[_Job], deque[_Job], bool]:
        """``first`` and the held or queued jobs with its options, within the size and time limits."""
        batch, size, rest = [first], len(first.ids), deque()
        for job in held:
            if job.options == first.options and size + len(job.ids) <= self.max_sentences:
                batch.append(job)
                size += len(job.ids)
            else:
                rest.append(job)
        deadline = time.monotonic() + self.max_wait
        while size < self.max_sentences:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return batch, rest, True
            if job.options == first.options and size + len(job.ids) <= self.max_sentences:
                batch.append(job)
                size += len(job.ids)
            else:
                rest.append(job)
        return batch, rest, False

    def _decode(self, batch: list[_Job]) -> None:
        o = batch[0].options
        try:
            results = self.translator.translate_encoded([ids for job in batch for ids in job.ids], o.beam, o.alpha,
                                                        o.max_len_ratio, n_best=o.n_best,
                                                        batch_tokens=self.batch_tokens)
        except Exception as e:  # noqa: BLE001 -- handed to every waiting request, the worker goes on
            for job in batch:
                job.future.set_exception(e)
            return
        self.batches += 1
        start = 0
        for job in batch:
            job.future.set_result(results[start:start + len(job.ids)])
            start += len(job.ids)


class TranslateRequest(BaseModel):
    texts: list[str] = Field(min_length=1, description="the segments to translate")
    beam: int | None = Field(None, ge=1, le=64, description="beam size; 1 is greedy (default: the server's)")
    alpha: float | None = Field(None, ge=0.0, le=5.0, description="GNMT length penalty exponent")
    n_best: int = Field(1, ge=1, description="return this many outputs per text, with scores")
    max_len_ratio: float | None = Field(None, gt=0.0, le=10.0, description="longest output / source length")


def create_app(translator: Translator, name: str = "model", precision: str = "fp32", beam: int = 5,
               alpha: float = 1.0, max_len_ratio: float = 2.0, max_texts: int = 1000,
               max_batch_sentences: int = 64, max_wait_ms: float = 5.0, batch_tokens: int = 8000) -> FastAPI:
    """The FastAPI application serving ``translator``; ``beam``, ``alpha`` and ``max_len_ratio``
    are the defaults for requests that leave them out."""
    batcher = Batcher(translator, max_batch_sentences, max_wait_ms, batch_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="encdec", summary=f"encoder-decoder Transformer: {name}", lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(RequestValidationError)
    async def one_line_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default answer is a list of error objects; every error here is one line instead.
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            reason = first.get("ctx", {}).get("error", "")
            return JSONResponse(status_code=422, content={"detail": f"the request body is not valid JSON: {reason}"})
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        message = first["msg"].removeprefix("Value error, ")
        return JSONResponse(status_code=422, content={"detail": f"{where}: {message}" if where else message})

    @app.get("/health")
    def health() -> dict:
        cfg = translator.model.cfg
        return {"status": "ok", "model": name, "precision": precision, "max_input_tokens": cfg.max_len - 1,
                "max_texts": max_texts, "defaults": {"beam": beam, "alpha": alpha, "max_len_ratio": max_len_ratio},
                "batches_decoded": batcher.batches}

    @app.post("/translate")
    async def translate(request: TranslateRequest) -> dict:
        if len(request.texts) > max_texts:
            raise HTTPException(413, f"{len(request.texts)} texts in one request; the server takes at most "
                                     f"{max_texts} (split the request or start it with a larger --max-texts)")
        options = DecodingOptions(request.beam or beam, alpha if request.alpha is None else request.alpha,
                                  request.n_best, request.max_len_ratio or max_len_ratio)
        if options.n_best > options.beam:  # one check for a given beam and for the default
            which = "beam" if request.beam else "the default beam"
            raise HTTPException(422, f"n_best={options.n_best} needs beam >= {options.n_best}, "
                                     f"got {which}={options.beam}")
        try:
            ids, unknown = translator.encode_checked(request.texts)
        except InputError as e:
            raise HTTPException(400, str(e).replace("input ", "text ", 1)) from None
        try:
            results = await asyncio.wrap_future(batcher.submit(ids, options))
        except ShuttingDown as e:
            raise HTTPException(503, str(e)) from None
        answer = {"translations": [hyps[0][0] for hyps in results], "unknown_symbols": sorted(unknown)}
        if request.n_best > 1:
            answer["n_best"] = [[{"text": text, "score": score} for text, score in hyps] for hyps in results]
        return answer

    return app
