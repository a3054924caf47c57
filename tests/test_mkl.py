"""encdec.mkl: MKL's AVX512 code on AMD CPUs, loaded by ``import encdec`` before PyTorch.

Each case runs in a fresh interpreter, since the shim only works if it is loaded before torch.
On a CPU the shim is not for (not AMD, no AVX512), the cases check that it stays off and says why.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from encdec import mkl


def run_python(code: str, **env) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line, returned as a dict."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def shim_expected() -> bool:
    """Whether this machine is one the shim is for, and the shim was built at install."""
    vendor, flags = mkl._cpu()
    built = importlib.util.find_spec("encdec._mkl_intel_path") is not None
    return sys.platform == "linux" and vendor == "AuthenticAMD" and "avx512f" in flags and built


STATUS = """
import json, encdec, torch
from encdec import mkl
torch.mm(torch.randn(256, 256), torch.randn(256, 256))
print(json.dumps({"status": mkl.status(), "consulted": mkl.consulted()}))
"""


def test_import_encdec_first_puts_mkl_on_its_avx512_path_on_amd():
    got = run_python(STATUS)
    if shim_expected():
        assert got["status"] == "MKL AVX512 path on AMD: on"
        assert got["consulted"] > 0  # MKL asked the shim whether the CPU is Intel's
    else:
        assert got["status"].startswith("MKL AVX512 path on AMD: off (") and got["consulted"] == 0


def test_torch_imported_first_or_switched_off_keeps_the_default_path():
    first = run_python("import torch\n" + STATUS)
    assert first["consulted"] == 0 and first["status"].startswith("MKL AVX512 path on AMD: off (")
    if shim_expected():
        assert first["status"] == "MKL AVX512 path on AMD: off (torch was imported before encdec)"
    off = run_python(STATUS, ENCDEC_MKL_AVX512="0")
    assert off == {"status": "MKL AVX512 path on AMD: off (ENCDEC_MKL_AVX512=0)", "consulted": 0}


# Float32 products on both paths against float64: MKL's AVX512 kernels must keep float32 precision.
# Shapes of training's products (weight gradients with transposed operands, batched attention).
PRODUCTS = """
import json, encdec, torch
from encdec import mkl
g = torch.Generator().manual_seed(0)
x, w = torch.randn(600, 256, generator=g, dtype=torch.float64), torch.randn(384, 256, generator=g, dtype=torch.float64)
q, k = torch.randn(24, 61, 64, generator=g, dtype=torch.float64), torch.randn(24, 61, 64, generator=g, dtype=torch.float64)
cases = {
    "linear": (torch.nn.functional.linear(x.float(), w.float()), x @ w.T),
    "weight gradient": (x.float().T @ torch.tanh(x.float()), x.T @ torch.tanh(x)),
    "attention scores": (q.float() @ k.float().transpose(1, 2), q @ k.transpose(1, 2)),
}
err = {name: float((a.double() - b).abs().max() / b.abs().max()) for name, (a, b) in cases.items()}
print(json.dumps({"status": mkl.status(), "error": err}))
"""


@pytest.mark.parametrize("switch", ["1", "0"])
def test_products_on_either_path_match_float64(switch):
    got = run_python(PRODUCTS, ENCDEC_MKL_AVX512=switch)
    assert got["status"].endswith(": on") == (switch == "1" and shim_expected())
    for name, error in got["error"].items():
        # float32 sums of up to 600 terms: ~1e-6 to 1e-5 of the largest entry; a kernel computing in
        # bf16 or TF32 internally would be off by ~1e-3, a wrong one by far more
        assert error < 5e-5, (name, error)


# A whole training step (tiny model, dropout off) on both paths: same loss and gradients.
STEP = """
import json, encdec, torch
from encdec import ModelConfig, build_model, mkl
from encdec.train import TranslationLoss
torch.manual_seed(0)
model = build_model(ModelConfig(50, 50, d_model=64, heads=4, ff=256, encoder_layers=2, decoder_layers=2,
                                dropout=0.0), seed=0)
src, tgt = torch.randint(3, 50, (6, 17)), torch.randint(3, 50, (6, 15))
loss = TranslationLoss(model, 0.1)(src, tgt[:, :-1], tgt[:, 1:])
loss.backward()
print(json.dumps({"status": mkl.status(), "loss": float(loss), "grads": {n: p.grad.flatten()[:64].tolist() for n, p in model.named_parameters()}}))
"""


def test_training_step_is_the_same_on_both_paths():
    on, off = run_python(STEP, ENCDEC_MKL_AVX512="1"), run_python(STEP, ENCDEC_MKL_AVX512="0")
    assert on["status"].endswith(": on") == shim_expected() and off["status"].endswith("=0)")
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-5)
    assert on["grads"].keys() == off["grads"].keys()
    for name in on["grads"]:
        assert on["grads"][name] == pytest.approx(off["grads"][name], rel=1e-3, abs=1e-5), name
