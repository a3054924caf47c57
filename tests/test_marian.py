"""Equality with Hugging Face: a random MarianMTModel saved with save_pretrained, loaded by encdec."""
import pytest
import torch

transformers = pytest.importorskip("transformers")  # a test extra: installed by .ci/run

from encdec import padding_mask
from encdec.marian import load_marian
from encdec.search import beam_search, greedy_search

PAD, EOS = 59, 0


def make_marian(tmp_path, **overrides):
    options = dict(vocab_size=60, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                   pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD, activation_function="swish",
                   scale_embedding=True, init_std=0.3)
    options.update(overrides)
    torch.manual_seed(0)
    hf = transformers.MarianMTModel(transformers.MarianConfig(**options)).eval()
    with torch.no_grad():
        # zero by default: make the bias matter, and favour the end token so outputs vary in length
        hf.final_logits_bias.normal_(std=0.1)
        hf.final_logits_bias[0, EOS] += 2.0
    hf.save_pretrained(tmp_path)
    return hf, load_marian(tmp_path)


def sources():
    g = torch.Generator().manual_seed(1)
    src = torch.randint(1, PAD, (4, 11), generator=g)
    src[:, -1] = EOS
    src[1, 7:] = PAD  # padded row (its EOS is overwritten: fine, the mask is what matters)
    src[2, 4:] = PAD
    return src


@pytest.mark.parametrize("overrides", [{}, {"activation_function": "gelu", "scale_embedding": False},
                                       {"share_encoder_decoder_embeddings": False, "tie_word_embeddings": False},
                                       {"tie_word_embeddings": False}])
def test_logits_agree_with_marian(tmp_path, overrides):
    hf, ours = make_marian(tmp_path, **overrides)
    src = sources()
    tgt = torch.randint(1, PAD, (4, 8), generator=torch.Generator().manual_seed(2))
    tgt[:, 0] = PAD  # Marian's decoder starts from <pad>
    with torch.no_grad():
        expected = hf(input_ids=src, attention_mask=(src != PAD).long(), decoder_input_ids=tgt).logits
        mask = padding_mask(src, PAD)
        got = ours.project(ours.decode(tgt, ours.encode(src, mask), mask))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_greedy_decoding_gives_identical_tokens(tmp_path):
    hf, ours = make_marian(tmp_path)
    src = sources()
    with torch.no_grad():
        generated = hf.generate(input_ids=src, attention_mask=(src != PAD).long(), num_beams=1, do_sample=False,
                                max_new_tokens=30, forced_eos_token_id=None)
    expected = []
    for row in generated.tolist():
        row = row[1:]  # drop the start token
        expected.append(row[: row.index(EOS)] if EOS in row else [t for t in row if t != PAD])
    got = greedy_search(ours, src, max_len_ratio=0.0, max_len_extra=31)  # 30 tokens + the end
    assert got == expected
    assert len({len(tokens) for tokens in got}) > 1, "the test needs outputs of several lengths"



def test_beam_search_gives_the_tokens_of_generate(tmp_path):
    """Beam 4 without length penalty, stopping at 4 finished hypotheses: HF's early_stopping=True."""
    hf, ours = make_marian(tmp_path)
    src = sources()
    with torch.no_grad():
        generated = hf.generate(input_ids=src, attention_mask=(src != PAD).long(), num_beams=4, do_sample=False,
                                max_new_tokens=30, length_penalty=0.0, early_stopping=True, forced_eos_token_id=None)
    expected = []
    for row in generated.tolist():
        row = row[1:]
        expected.append(row[: row.index(EOS)] if EOS in row else [t for t in row if t != PAD])
    got = [hyps[0].tokens for hyps in beam_search(ours, src, beam_size=4, alpha=0.0, max_len_ratio=0.0,
                                                   max_len_extra=31)]
    assert got == expected
    assert got != greedy_search(ours, src, max_len_ratio=0.0, max_len_extra=31), "beam search should matter here"


def test_not_a_marian_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_marian(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="not 'marian'"):
        load_marian(tmp_path)
