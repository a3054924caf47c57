"""Multi-process training under torchrun: two gloo processes on CPU train exactly like one process on the
same global batches, resume exactly, and stop together, cleanly, when one of them dies."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml

from encdec import distributed
from encdec.checkpoint import load_model_folder
from encdec.config import load_config, to_dict
from encdec.train import Trainer

from test_train import make_reverse_task, reverse_config

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available() and sys.platform == "linux"),
                                reason="needs torch.distributed with gloo, and Linux's /proc to find the workers")

K, N = 4, 8  # checkpoints after K and N steps


def write_config(folder: Path, name: str, **train) -> tuple[Path, Path]:
    """A tiny reverse-task config in ``folder/name.yaml`` (threads: 1 per rank); returns it and its run folder."""
    options = {"max_steps": N, "validate_every": K, "keep_checkpoints": 5, "threads": 1, "device": "cpu"}
    dropout = train.pop("dropout", 0.1)
    options.update(train)
    cfg = reverse_config(folder / "data", **options)
    cfg.model["dropout"] = dropout
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
    return path, folder / "runs" / name


def torchrun_command(config: Path, run: Path, nproc: int = 2) -> list[str]:
    # --standalone: a private rendezvous on a free port. "--" keeps torchrun's own parser away from
    # encdec's options (it would take --run for an abbreviation of its --run-path).
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "encdec", "--", "train", str(config), "--run", str(run)]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def start(command: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start torchrun in its own session, so a failed test can stop it and its workers together."""
    with open(log, "wb") as out:
        return subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=clean_env(),
                                start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def torchrun(config: Path, run: Path, timeout: float = 150) -> str:
    """Run a 2-process training to its end; returns its output."""
    log = run.parent / f"{run.name}.{time.monotonic_ns()}.log"
    run.parent.mkdir(parents=True, exist_ok=True)
    proc = start(torchrun_command(config, run), config.parent, log)
    try:
        rc = proc.wait(timeout)
    finally:
        stop(proc)
    output = log.read_text(errors="replace")
    assert rc == 0, f"torchrun exited {rc}:\n{output[-4000:]}"
    return output


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_model_folder(folder)[0].state_dict()


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ddp")
    make_reverse_task(folder / "data", n_train=400, n_dev=20)
    return folder


def test_two_ranks_train_like_one_rank_on_the_same_global_batches(workdir):
    # Dropout 0: with dropout the two runs would draw different masks for the same sentence, so they would
    # be equally good but not equal. Adam's eps 1e-6 instead of 1e-9: the attention key bias has a gradient
    # that is exactly zero in exact arithmetic (softmax ignores a constant added to all scores), so in floats
    # it is rounding noise (~1e-11), which Adam with eps 1e-9 would blow up into steps of ~lr (3e-3 here) of
    # arbitrary sign in any two runs that merely sum in another order, one process or not.
    config, run = write_config(workdir, "equal", dropout=0.0, eps=1e-6)
    output = torchrun(config, run)

    single = workdir / "runs" / "single"
    Trainer(load_config(config), single).train()  # the same config in this process: one rank
    for step in (K, N):
        two, one = (weights(r / "checkpoints" / f"step-{step:08d}") for r in (run, single))
        for name, value in one.items():
            torch.testing.assert_close(two[name], value, rtol=0, atol=1e-5, msg=lambda m: f"{name} at step {step}: {m}")

    # Rank 0 alone logs, validates and writes.
    assert steps_logged(run) == [K, N]
    assert output.count("stopped at step 8") == 1 and output.count("training pairs:") == 1, output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-{K:08d}", f"step-{N:08d}"]


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
        except (OSError, IndexError, ValueError):
            pass  # the process ended while we looked
    return kids


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


@pytest.fixture(scope="module")
def resumed_then_killed(workdir) -> dict:
    """A 2-rank run straight to N steps, and the same run resumed from its step-K checkpoint, then killed.

    The resumed run is the one killed, which saves a launch (each costs ~15 s here): once it has written
    its step-N checkpoint it is still training (max_steps is large), and then rank 1 gets SIGKILL.
    With dropout (every rank must draw after the resume the masks it would have drawn without one) and
    bf16 autocast on CPU.
    """
    config, straight = write_config(workdir, "straight", dropout=0.1, precision="bf16", keep_checkpoints=100)
    torchrun(config, straight)
    endless, resumed = write_config(workdir, "resumed", dropout=0.1, precision="bf16", keep_checkpoints=100,
                                    max_steps=100000)
    # The interrupted run: the straight run's folder as it was after K steps.
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns(f"step-{N:08d}*", "best*"))
    (resumed / "log.jsonl").write_text((straight / "log.jsonl").read_text().splitlines()[0] + "\n")

    log = workdir / "resumed.log"
    proc = start(torchrun_command(endless, resumed), workdir, log)
    workers: dict[int, int] = {}
    rc = None
    try:
        deadline = time.monotonic() + 120
        while not (resumed / "checkpoints" / f"step-{N:08d}").exists():  # both ranks are training
            assert proc.poll() is None, f"torchrun ended early:\n{log.read_text(errors='replace')[-4000:]}"
            assert time.monotonic() < deadline, f"no step-{N} checkpoint in 120 s"
            time.sleep(0.1)
        workers = {_rank_of(pid): pid for pid in _children(proc.pid)}
        assert set(workers) == {0, 1}, workers
        os.kill(workers[1], signal.SIGKILL)
        started = time.monotonic()
        rc = proc.wait(60)  # torchrun notices the dead rank and stops the other one
        seconds = time.monotonic() - started
    finally:
        stop(proc)
    return {"straight": straight, "resumed": resumed, "output": log.read_text(errors="replace"), "rc": rc,
            "workers": workers, "seconds": seconds}


def test_resume_under_two_ranks_continues_exactly(resumed_then_killed):
    straight, resumed = resumed_then_killed["straight"], resumed_then_killed["resumed"]
    assert resumed_then_killed["output"].count(f"at step {K}") == 1  # "resumed from ... at step 4", rank 0 only
    assert steps_logged(resumed)[:2] == [K, N]
    a, b = weights(straight / "checkpoints" / f"step-{N:08d}"), weights(resumed / "checkpoints" / f"step-{N:08d}")
    for name, value in a.items():
        assert torch.equal(value, b[name]), f"{name} differs after resuming under DDP"
    assert 0 < json.loads((resumed / "log.jsonl").read_text().splitlines()[1])["dev_loss"] < 10  # bf16 trains


def test_killing_one_rank_stops_all_ranks_with_a_clear_message(resumed_then_killed):
    output, workers = resumed_then_killed["output"], resumed_then_killed["workers"]
    assert resumed_then_killed["rc"] not in (0, None), output[-4000:]
    assert resumed_then_killed["seconds"] < 60
    # torchrun names the rank that died first, and how.
    assert "Root Cause" in output and "Signal 9 (SIGKILL)" in output, output[-4000:]
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers.values() if _alive(pid)], "a worker outlived torchrun"
    # A surviving rank that saw the failure before torchrun stopped it says what happened.
    if "lost contact" in output:
        assert "rank 0 of 2 lost contact with the other ranks" in output


def test_a_failed_collective_becomes_one_clear_line():
    ctx = distributed.Context(rank=1, world_size=2, timeout_minutes=10)
    gloo = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:34953: "
                        "Connection reset by peer. This is typically caused by a remote worker crashing.\nmore")
    with pytest.raises(distributed.DistributedError, match=r"^rank 1 of 2 lost contact .* Connection reset by peer"):
        with distributed.explain_failures(ctx):
            raise gloo
    with pytest.raises(ValueError, match="unrelated"):  # other errors pass through unchanged
        with distributed.explain_failures(ctx):
            raise ValueError("unrelated")
    with pytest.raises(RuntimeError, match="gloo"):  # and one process has no peers to lose
        with distributed.explain_failures(distributed.Context()):
            raise gloo


def test_dropout_seeds_differ_by_rank_and_step_and_repeat():
    def draw(step, rank):
        distributed.seed_step(7, step, rank)
        return torch.rand(4)

    assert torch.equal(draw(3, 0), draw(3, 0))
    assert not torch.equal(draw(3, 0), draw(3, 1))
    assert not torch.equal(draw(3, 0), draw(4, 0))


def test_one_process_context_needs_no_process_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    assert ctx.sum(3.0) == 3.0 and ctx.broadcast(5) == 5
    ctx.wait_for_main(), ctx.barrier(), ctx.check_same(4, "the step")
    assert not dist.is_initialized()
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=distributed.TIMEOUT_ENV):
        distributed.setup("cpu")
