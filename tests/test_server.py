"""The HTTP server: answers equal the Translator's, requests arriving together share one decoding
batch without changing anyone's answer, bad requests get one line, and ``encdec serve`` listens."""
import json
import socket
import subprocess
import sys
import urllib.request

import pytest
from fastapi.testclient import TestClient

from encdec import load
from encdec.cli import G2P_MODEL
from encdec.server import Batcher, DecodingOptions, ShuttingDown, create_app

from test_cli import assert_one_line_error, run_cli

WORDS = ["HELLO", "WORLD", "TRANSFORMER", "ATTENTION", "A", "PHONEME", "ENCODER", "DECODER"]


@pytest.fixture(scope="module")
def translator():
    return load(G2P_MODEL)


@pytest.fixture(scope="module")
def client(translator):
    with TestClient(create_app(translator, name="g2p", beam=3, alpha=0.0, max_texts=10)) as client:
        yield client


def test_health_describes_the_model(client, translator):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "g2p"
    assert health["max_input_tokens"] == translator.model.cfg.max_len - 1
    assert health["defaults"]["beam"] == 3


@pytest.mark.parametrize("options", [{}, {"beam": 1}, {"beam": 5, "alpha": 1.0}])
def test_answers_equal_the_translator(client, translator, options):
    answer = client.post("/translate", json={"texts": WORDS, **options})
    assert answer.status_code == 200, answer.text
    beam, alpha = options.get("beam", 3), options.get("alpha", 0.0)  # the server's defaults fill the gaps
    assert answer.json()["translations"] == translator.translate(WORDS, beam=beam, alpha=alpha)
    assert answer.json()["unknown_symbols"] == [] and "n_best" not in answer.json()


def test_n_best_lists_are_sorted_and_led_by_the_translation(client):
    answer = client.post("/translate", json={"texts": WORDS[:3], "beam": 4, "n_best": 3}).json()
    for translation, hyps in zip(answer["translations"], answer["n_best"]):
        assert len(hyps) == 3 and hyps[0]["text"] == translation
        scores = [h["score"] for h in hyps]
        assert scores == sorted(scores, reverse=True)


def test_unknown_symbols_are_reported(client):
    answer = client.post("/translate", json={"texts": ["HELLO", "hé5"]}).json()
    assert answer["unknown_symbols"] == ["5", "É"] and len(answer["translations"]) == 2  # the tokenizer folds case


@pytest.mark.parametrize("body, status, message", [
    ({"texts": []}, 422, "texts: List should have at least 1 item"),
    ({"texts": ["A"] * 11}, 413, "11 texts in one request; the server takes at most 10"),
    ({"texts": ["A", "B" * 60]}, 400, "text 2 has 61 tokens but the model takes at most 47"),
    ({"texts": ["A"], "beam": 2, "n_best": 3}, 422, "n_best=3 needs beam >= 3, got beam=2"),
    ({"texts": ["A"], "n_best": 4}, 422, "n_best=4 needs beam >= 4, got the default beam=3"),
    ({"texts": ["A"], "beam": 0}, 422, "beam: Input should be greater than or equal to 1"),
    ({"text": ["A"]}, 422, "texts: Field required"),
])
def test_bad_requests_get_one_line(client, body, status, message):
    answer = client.post("/translate", json=body)
    assert answer.status_code == status
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and message in detail, detail


def test_malformed_json_gets_one_line(client):
    answer = client.post("/translate", content=b'{"texts": [', headers={"content-type": "application/json"})
    assert answer.status_code == 422 and "not valid JSON" in answer.json()["detail"], answer.text


def test_requests_queued_together_share_a_batch_and_keep_their_answers(translator):
    greedy, beam = DecodingOptions(1, 1.0, 1, 2.0), DecodingOptions(3, 0.0, 2, 2.0)
    requests = [(WORDS[i:i + 2], greedy if i % 4 == 0 else beam) for i in range(0, len(WORDS), 2)]
    batcher = Batcher(translator, max_batch_sentences=64, max_wait_ms=0)
    futures = [batcher.submit(translator.encode(texts), options) for texts, options in requests]
    batcher.start()  # everything is queued before the worker looks: two option sets, two batches
    answers = [future.result(timeout=60) for future in futures]
    batcher.stop()
    assert batcher.batches == 2
    for (texts, o), answer in zip(requests, answers):
        alone = translator.translate_nbest(texts, o.beam, o.alpha, o.max_len_ratio, n_best=o.n_best)
        assert [[text for text, _ in hyps] for hyps in answer] == [[text for text, _ in hyps] for hyps in alone]
        assert [s for hyps in answer for _, s in hyps] == pytest.approx([s for hyps in alone for _, s in hyps],
                                                                       abs=1e-4)


def test_batches_respect_the_size_limit(translator):
    batcher = Batcher(translator, max_batch_sentences=3, max_wait_ms=0)
    options = DecodingOptions(1, 1.0, 1, 2.0)
    futures = [batcher.submit(translator.encode([word]), options) for word in WORDS]
    batcher.start()
    assert [f.result(timeout=60)[0][0][0] for f in futures] == translator.translate(WORDS)
    batcher.stop()
    assert batcher.batches == 3  # 8 single-word requests, at most 3 words a batch


def test_a_failing_batch_fails_its_requests_only(translator, monkeypatch):
    batcher = Batcher(translator, max_wait_ms=0)
    real, calls = translator.translate_encoded, []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(translator, "translate_encoded", fail_once)
    batcher.start()
    options = DecodingOptions(1, 1.0, 1, 2.0)
    with pytest.raises(RuntimeError, match="boom"):
        batcher.submit(translator.encode(["HELLO"]), options).result(timeout=60)
    assert batcher.submit(translator.encode(["HELLO"]), options).result(timeout=60)[0][0][0] == "HH EH L OW"
    batcher.stop()


def test_stopping_refuses_what_is_still_queued(translator):
    batcher = Batcher(translator)
    batcher._queue.put(None)  # the worker will stop before it reaches the job below
    future = batcher.submit(translator.encode(["HELLO"]), DecodingOptions(1, 1.0, 1, 2.0))
    batcher.start()
    with pytest.raises(ShuttingDown):
        future.result(timeout=60)
    batcher._thread.join(timeout=60)
    batcher.stop()
    with pytest.raises(ShuttingDown):  # after stop() a request fails at once instead of waiting forever
        batcher.submit(translator.encode(["HELLO"]), DecodingOptions(1, 1.0, 1, 2.0)).result(timeout=1)


def test_serve_verb_listens_and_answers():
    process = subprocess.Popen([sys.executable, "-m", "encdec", "serve", "--model", str(G2P_MODEL), "--port", "0",
                                "--beam", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("serving "), line + process.stderr.read()
        url = line.split()[3]
        with urllib.request.urlopen(f"{url}/health", timeout=60) as response:
            assert json.load(response)["defaults"]["beam"] == 1
        request = urllib.request.Request(f"{url}/translate", data=json.dumps({"texts": ["HELLO"]}).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.load(response)["translations"] == ["HH EH L OW"]
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_a_taken_port_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_line_error(run_cli("serve", "--model", G2P_MODEL, "--port", port),
                              f"cannot listen on 127.0.0.1:{port}")
