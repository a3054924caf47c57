"""encdec: the encoder-decoder Transformer for sequence-to-sequence work."""
# First, before anything imports torch: MKL's AVX512 code on AMD CPUs (see encdec/mkl.py).
from .mkl import enable_avx512

enable_avx512()

from .attention import MultiHeadAttention, padding_mask, subsequent_mask
from .config import ConfigError, ModelConfig, RunConfig, load_config
from .embeddings import Embeddings, PositionalEncoding
from .layers import DecoderLayer, EncoderLayer, FeedForward
from .model import Decoder, Encoder, Transformer, build_model
from .translator import Translator, load

__version__ = "0.1.0"
__all__ = [
    "ConfigError", "Decoder", "DecoderLayer", "Embeddings", "Encoder", "EncoderLayer", "FeedForward",
    "ModelConfig", "MultiHeadAttention", "RunConfig", "load_config", "PositionalEncoding", "Transformer", "build_model",
    "Translator", "load", "padding_mask", "subsequent_mask",
]
