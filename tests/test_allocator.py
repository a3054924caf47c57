"""glibc's malloc told to keep freed large blocks (encdec.allocator), and who asks for it."""
import ctypes.util
import platform
import subprocess
import sys

import pytest

from encdec import allocator

GLIBC = platform.libc_ver()[0] == "glibc" and ctypes.util.find_library("c") is not None

# A fresh process allocates and frees a 64 MiB tensor (above glibc's largest automatic mmap
# threshold) 16 times and prints the page faults of the last four. (Tuned, the heap still grows
# by the block's size a few times before the freed space is large enough to serve it.)
FAULTS = """
import resource, sys, torch
from encdec.allocator import reuse_freed_memory
if sys.argv[1] == "tuned":
    assert reuse_freed_memory()
for _ in range(12):
    torch.ones(16 * 2 ** 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    torch.ones(16 * 2 ** 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_tuning_is_applied_on_glibc_unless_the_user_set_its_tunables(monkeypatch):
    """It raises glibc's mmap and trim thresholds, and leaves them alone where the user chose
    malloc settings or asked for the defaults."""
    tune = allocator.reuse_freed_memory.__wrapped__  # uncached
    for name in ("ENCDEC_MALLOC_DEFAULTS", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    assert tune() is GLIBC
    monkeypatch.setenv("ENCDEC_MALLOC_DEFAULTS", "1")
    assert tune() is False
    monkeypatch.delenv("ENCDEC_MALLOC_DEFAULTS")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000")
    assert tune() is False


@pytest.mark.skipif(not GLIBC, reason="mallopt's thresholds are glibc's")
def test_freed_large_blocks_come_back_without_page_faults():
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("ENCDEC_MALLOC_DEFAULTS", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS, mode], env=env, capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "tuned")}
    pages = 4 * 64 * 2 ** 20 // 4096
    assert faults["default"] > pages // 2, f"glibc's defaults map fresh pages each time: {faults}"
    assert faults["tuned"] < pages // 20, f"tuned, the freed block is reused: {faults}"


def test_training_and_decoding_processes_ask_for_it(monkeypatch, tmp_path):
    from encdec import inference, train
    from test_train import make_reverse_task, reverse_config
    calls = []
    monkeypatch.setattr(train, "reuse_freed_memory", lambda: calls.append("train"))
    monkeypatch.setattr(inference, "reuse_freed_memory", lambda: calls.append("inference"))
    make_reverse_task(tmp_path / "data", n_train=50, n_dev=5)
    trainer = train.Trainer(reverse_config(tmp_path / "data", max_steps=1), tmp_path / "run")
    inference.prepare_for_cpu(trainer.model)
    assert calls == ["train", "inference"]
