"""Load Marian / OPUS-MT checkpoints saved by Hugging Face ``save_pretrained``.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (or the
older ``pytorch_model.bin``, read with ``torch.load(weights_only=True)`` so no
arbitrary object is ever unpickled). Marian differs from the paper in a few
choices, each an encdec option: sines and cosines in two halves, swish/GELU
activation, optional embedding scaling, a final logits bias, and decoding that
starts from the <pad> token.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import ModelConfig
from .model import Transformer, build_model

_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "swish", "silu": "swish"}


def marian_config(hf: dict) -> ModelConfig:
    """Translate a Hugging Face ``MarianConfig`` (as a dict) into a :class:`ModelConfig`."""
    def same(a: str, b: str):
        if hf[a] != hf[b]:
            raise ValueError(f"Marian config has {a}={hf[a]} but {b}={hf[b]}; encdec needs them equal")
        return hf[a]

    activation = _ACTIVATIONS.get(hf.get("activation_function", "gelu"))
    if activation is None:
        raise ValueError(f"Marian activation {hf['activation_function']!r} is not supported; "
                         f"supported: {', '.join(_ACTIVATIONS)}")
    if hf.get("normalize_before", False):
        raise ValueError("Marian checkpoints with normalize_before=true are not supported")
    share = hf.get("share_encoder_decoder_embeddings", True)
    vocab = hf["vocab_size"]
    start = hf.get("decoder_start_token_id", hf["pad_token_id"])
    return ModelConfig(
        src_vocab_size=vocab,
        tgt_vocab_size=vocab if share else hf.get("decoder_vocab_size") or vocab,
        d_model=hf["d_model"],
        heads=same("encoder_attention_heads", "decoder_attention_heads"),
        ff=same("encoder_ffn_dim", "decoder_ffn_dim"),
        encoder_layers=hf["encoder_layers"], decoder_layers=hf["decoder_layers"],
        dropout=hf.get("dropout", 0.1), attention_dropout=hf.get("attention_dropout", 0.0),
        activation_dropout=hf.get("activation_dropout", 0.0), activation=activation,
        max_len=hf["max_position_embeddings"], norm="post", final_norm=False,
        positional="sinusoidal", sinusoid_layout="halves",
        scale_embeddings=hf.get("scale_embedding", False), share_embeddings=share,
        tie_output=hf.get("tie_word_embeddings", True), output_bias=True,
        pad_id=hf["pad_token_id"], bos_id=start, eos_id=hf["eos_token_id"], decoder_start_id=start,
    )


def _attention(dst: dict, ours: str, prefix: str, theirs: dict) -> None:
    """Stack Marian's separate q/k/v projections into encdec's fused ``in_proj``."""
    for kind in ("weight", "bias"):
        dst[f"{ours}.in_proj.{kind}"] = torch.cat([theirs[f"{prefix}.{p}_proj.{kind}"] for p in "qkv"])
        dst[f"{ours}.out_proj.{kind}"] = theirs[f"{prefix}.out_proj.{kind}"]


def _norm(dst: dict, ours: str, theirs: dict, name: str) -> None:
    for kind in ("weight", "bias"):
        dst[f"{ours}.norm.{kind}"] = theirs[f"{name}.{kind}"]


def _feed_forward(dst: dict, ours: str, prefix: str, theirs: dict) -> None:
    for kind in ("weight", "bias"):
        dst[f"{ours}.feed_forward.w_1.{kind}"] = theirs[f"{prefix}.fc1.{kind}"]
        dst[f"{ours}.feed_forward.w_2.{kind}"] = theirs[f"{prefix}.fc2.{kind}"]


def marian_state_dict(theirs: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (and fuse) a Marian state dict into encdec's :class:`Transformer` names."""
    theirs = {k.removeprefix("model."): v for k, v in theirs.items()}
    shared = theirs.get("shared.weight")
    src_emb = theirs.get("encoder.embed_tokens.weight", shared)
    tgt_emb = theirs.get("decoder.embed_tokens.weight", shared)
    if src_emb is None or tgt_emb is None:
        raise ValueError("the Marian checkpoint has no token embeddings (shared.weight or embed_tokens.weight)")
    ours: dict[str, torch.Tensor] = {"src_embed.lut.weight": src_emb, "tgt_embed.lut.weight": tgt_emb,
                                     "output.weight": theirs.get("lm_head.weight", tgt_emb),
                                     "output.bias": theirs["final_logits_bias"].reshape(-1)}
    for i in range(cfg.encoder_layers):
        p, o = f"encoder.layers.{i}", f"encoder.layers.{i}"
        _attention(ours, f"{o}.self_attn", f"{p}.self_attn", theirs)
        _norm(ours, f"{o}.sublayers.0", theirs, f"{p}.self_attn_layer_norm")
        _feed_forward(ours, o, p, theirs)
        _norm(ours, f"{o}.sublayers.1", theirs, f"{p}.final_layer_norm")
    for i in range(cfg.decoder_layers):
        p, o = f"decoder.layers.{i}", f"decoder.layers.{i}"
        _attention(ours, f"{o}.self_attn", f"{p}.self_attn", theirs)
        _norm(ours, f"{o}.sublayers.0", theirs, f"{p}.self_attn_layer_norm")
        _attention(ours, f"{o}.cross_attn", f"{p}.encoder_attn", theirs)
        _norm(ours, f"{o}.sublayers.1", theirs, f"{p}.encoder_attn_layer_norm")
        _feed_forward(ours, o, p, theirs)
        _norm(ours, f"{o}.sublayers.2", theirs, f"{p}.final_layer_norm")
    return ours


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").exists():
        return load_file(path / "model.safetensors")
    if (path / "pytorch_model.bin").exists():
        # weights_only refuses anything but tensors and plain containers: no code runs on load.
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin; is this a Marian checkpoint folder?")


def _untie_where_weights_differ(cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> ModelConfig:
    """Trust the tensors over the flags: transformers may save distinct matrices for weights the
    config calls shared (e.g. ``tie_word_embeddings=false`` also unties encoder and decoder)."""
    src, tgt = weights.get("encoder.embed_tokens.weight"), weights.get("decoder.embed_tokens.weight")
    head = weights.get("lm_head.weight")
    share = cfg.share_embeddings and not (src is not None and tgt is not None and not torch.equal(src, tgt))
    tie = cfg.tie_output and not (head is not None and tgt is not None and not torch.equal(head, tgt))
    return replace(cfg, share_embeddings=share, tie_output=tie)


def load_marian(path: str | Path) -> Transformer:
    """Build an encdec :class:`Transformer` from a Marian checkpoint folder, in eval mode."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json; pass a folder written by MarianMTModel.save_pretrained")
    hf = json.loads(config_file.read_text(encoding="utf-8"))
    if hf.get("model_type") != "marian":
        raise ValueError(f"{path}: model_type is {hf.get('model_type')!r}, not 'marian'")
    weights = _read_weights(path)
    cfg = _untie_where_weights_differ(marian_config(hf), {k.removeprefix("model."): v for k, v in weights.items()})
    model = build_model(cfg)
    state = marian_state_dict(weights, cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # With shared or tied weights, several names point at one tensor; only report real gaps.
    missing = [k for k in missing if k not in ("tgt_embed.lut.weight", "output.weight") and "table" not in k]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()
