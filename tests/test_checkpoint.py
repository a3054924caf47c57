"""Model folders in every weight format: float32, float16 and int8 with per-row scales."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from encdec.checkpoint import (INT8_SCALE, MODEL_FILE, CheckpointError, load_model_folder, save_model_folder,
                               stored_weights)
from encdec.inference import quantize_rows
from encdec.tokenizer import train_tokenizer

from conftest import random_batch, tiny_model

TIED = dict(src_vocab_size=40, tgt_vocab_size=40, share_embeddings=True, tie_output=True)


def save(folder, model, weights):
    folder.mkdir()
    tok = train_tokenizer("char", ["abcdef"], folder / "tok.json")
    save_model_folder(folder, model, tok, tok, weights=weights)
    return load_model_folder(folder)[0]


@pytest.mark.parametrize("tied", [False, True])
def test_int8_weights_are_within_half_a_step_per_row_and_a_quarter_of_the_size(tmp_path, tied):
    model = tiny_model(d_model=64, ff=256, **(TIED if tied else {}))
    full, int8 = save(tmp_path / "fp32", model, "float32"), save(tmp_path / "int8", model, "int8")
    assert [stored_weights(tmp_path / f) for f in ("fp32", "int8")] == ["float32", "int8"]
    for name, value in model.state_dict().items():
        torch.testing.assert_close(full.state_dict()[name], value, rtol=0, atol=0)
        loaded = int8.state_dict()[name]
        assert loaded.dtype == torch.float32
        if value.dim() == 2:  # matrices: quantized per row
            step = value.abs().amax(1, keepdim=True) / 127
            assert ((loaded - value).abs() <= step / 2 + 1e-7).all(), name
        else:  # biases, layer norms: kept exactly
            torch.testing.assert_close(loaded, value, rtol=0, atol=0)
    if tied:
        assert int8.tgt_embed is int8.src_embed and int8.output.weight is int8.tgt_embed.lut.weight
    sizes = {f: (tmp_path / f / MODEL_FILE).stat().st_size for f in ("fp32", "int8")}
    assert sizes["int8"] < 0.3 * sizes["fp32"], sizes
    src, tgt = random_batch(model.cfg)
    with torch.no_grad():
        torch.testing.assert_close(int8(src, tgt), model(src, tgt), atol=0.05, rtol=0)


def test_float16_weights_round_like_float16(tmp_path):
    model = tiny_model()
    half = save(tmp_path / "half", model, "float16")
    assert stored_weights(tmp_path / "half") == "float16"
    for name, value in model.state_dict().items():
        torch.testing.assert_close(half.state_dict()[name], value.half().float(), rtol=0, atol=0)


def test_requantizing_int8_weights_gives_the_same_integers():
    """int8 decoding of an int8-stored model sees exactly the stored weights."""
    weight = torch.randn(50, 33) * torch.rand(50, 1) * 3
    q, scale = quantize_rows(weight)
    q2, scale2 = quantize_rows(q.float() * scale[:, None])
    assert torch.equal(q, q2) and torch.allclose(scale, scale2, rtol=1e-6, atol=0)
    assert q.abs().amax(1).eq(127).all(), "each row uses the full range"


def test_int8_matrix_without_its_scales_is_a_clear_error(tmp_path):
    save(tmp_path / "int8", tiny_model(), "int8")
    path = tmp_path / "int8" / MODEL_FILE
    state = load_file(str(path))
    scale_key = next(k for k in state if k.endswith(INT8_SCALE))
    del state[scale_key]
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="lacks its"):
        load_model_folder(tmp_path / "int8")


def test_unknown_weight_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not one of"):
        save(tmp_path / "x", tiny_model(), "int4")
