"""CMUdict grapheme-to-phoneme conversion (stress-free, 39 phonemes)."""
