import numpy as np
import pytest
import torch

from encdec.data import (BatchIterator, BinarizedCorpus, collate, read_pairs, read_parallel,
                         read_tsv, shard, token_batches)
from encdec.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer


def write(path, text):
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


def test_read_parallel_streams_pairs(tmp_path):
    src = write(tmp_path / "a.src", "hello\r\nwo\rrld\n\n")
    tgt = write(tmp_path / "a.tgt", "\ufeffbonjour\nmonde\nvide")
    assert list(read_parallel(src, tgt)) == [("hello", "bonjour"), ("wo\rrld", "monde"),
                                             ("", "vide")]
    assert list(read_pairs((src, tgt))) == list(read_parallel(src, tgt))


@pytest.mark.parametrize("src_text, tgt_text, short", [
    ("a\nb\nc\n", "x\ny\n", "b.tgt ends after 2 lines but .*a.src has more"),
    ("a\n", "x\ny\n", "a.src ends after 1 lines but .*b.tgt has more"),
])
def test_read_parallel_length_mismatch(tmp_path, src_text, tgt_text, short):
    src, tgt = write(tmp_path / "a.src", src_text), write(tmp_path / "b.tgt", tgt_text)
    with pytest.raises(ValueError, match=short):
        list(read_parallel(src, tgt))


def test_invalid_utf8_names_file_and_line(tmp_path):
    src = write(tmp_path / "a.src", b"ok\nbad \xff byte\n")
    tgt = write(tmp_path / "a.tgt", "x\ny\n")
    with pytest.raises(ValueError, match=r"a\.src:2: invalid UTF-8"):
        list(read_parallel(src, tgt))


def test_read_tsv(tmp_path):
    good = write(tmp_path / "good.tsv", "cat\tK AE T\ndog\tD AO G\n")
    assert list(read_tsv(good)) == [("cat", "K AE T"), ("dog", "D AO G")]
    assert list(read_pairs(good)) == list(read_tsv(good))
    bad = write(tmp_path / "bad.tsv", "cat\tK AE T\ndog\tD\tAO G\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:2: expected 2 tab-separated columns, found 3"):
        list(read_tsv(bad))


@pytest.fixture
def char_tok(tmp_path):
    return train_tokenizer("char", ["abcdefghij "], tmp_path / "char.json")


def test_binarized_corpus_round_trip_and_drop_counts(tmp_path, char_tok):
    pairs = [("abc", "de"), ("", "x"), ("abcdefgh", "a"), ("a", "b"), ("ab", ""),
             ("j", "abcdefghij")]
    corpus = BinarizedCorpus.build(iter(pairs), char_tok, char_tok, tmp_path / "bin", max_len=8)
    kept = [("abc", "de"), ("a", "b")]  # "abcdefgh"+EOS and "abcdefghij"+EOS exceed 8
    assert (len(corpus), corpus.n_dropped, corpus.n_empty) == (2, 2, 2)

    reloaded = BinarizedCorpus.load(tmp_path / "bin")
    for c in (corpus, reloaded):
        assert c.src_lengths.tolist() == [3, 1] and c.tgt_lengths.tolist() == [2, 1]
        for i, (src, tgt) in enumerate(kept):
            src_ids, tgt_ids = c.pair(i)
            assert src_ids.tolist() == char_tok.encode(src)
            assert tgt_ids.tolist() == char_tok.encode(tgt)
    assert (reloaded.n_dropped, reloaded.n_empty) == (2, 2)
    with pytest.raises(IndexError):
        corpus.pair(2)


def test_binarized_corpus_errors(tmp_path, char_tok):
    with pytest.raises(ValueError, match="no usable segment pairs in"):
        BinarizedCorpus.build([("", "a"), ("abc", "abc")], char_tok, char_tok, tmp_path / "b",
                              max_len=2)
    with pytest.raises(FileNotFoundError, match="build it with BinarizedCorpus.build"):
        BinarizedCorpus.load(tmp_path / "b")


def random_lengths(n, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(1, 80, n)
    tgt = np.maximum(1, src + rng.integers(-3, 4, n))  # correlated, as in real parallel text
    return src, tgt


def cost(batch, src, tgt):
    return len(batch) * max(src[batch].max(), tgt[batch].max())


def test_token_batches_cover_each_index_once_within_budget():
    src, tgt = random_lengths(3000)
    src[7] = 500  # longer than max_tokens: must still get a batch of its own
    batches = token_batches(src, tgt, max_tokens=400, seed=1, epoch=0)
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(3000))
    for b in batches:
        assert cost(b, src, tgt) <= 400 or len(b) == 1
    assert [7] in [b.tolist() for b in batches]


def test_token_batches_deterministic_per_seed_and_epoch():
    src, tgt = random_lengths(2000)
    run = lambda seed, epoch: [b.tolist() for b in token_batches(src, tgt, 300, seed, epoch)]
    assert run(3, 1) == run(3, 1)
    assert run(3, 1) != run(3, 2)
    assert run(3, 1) != run(4, 1)


def test_token_batches_pad_far_less_than_random_batching():
    src, tgt = random_lengths(5000)
    batches = token_batches(src, tgt, max_tokens=1000, seed=0, epoch=0)
    real = int(np.maximum(src, tgt).sum())
    sorted_pad = 1 - real / sum(cost(b, src, tgt) for b in batches)
    # Random batches with the same sizes.
    perm = np.random.default_rng(0).permutation(len(src))
    random = np.split(perm, np.cumsum([len(b) for b in batches])[:-1])
    random_pad = 1 - real / sum(cost(b, src, tgt) for b in random)
    assert sorted_pad < 0.05 and random_pad > 0.3


def test_shard_partitions_a_batch():
    batch = np.array([5, 9, 2, 7, 4])
    parts = [shard(batch, r, 2) for r in range(2)]
    assert parts[0].tolist() == [5, 2, 4] and parts[1].tolist() == [9, 7]
    with pytest.raises(ValueError):
        shard(batch, 2, 2)


def test_collate_hand_checked():
    batch = collate([([5, 6, 7], [8]), ([9], [10, 11, 12])], pad_id=0, bos_id=1, eos_id=2)
    assert batch.src.tolist() == [[5, 6, 7, 2], [9, 2, 0, 0]]
    assert batch.tgt_in.tolist() == [[1, 8, 0, 0], [1, 10, 11, 12]]
    assert batch.tgt_out.tolist() == [[8, 2, 0, 0], [10, 11, 12, 2]]
    assert batch.n_tgt_tokens == 6
    assert batch.src.dtype == torch.long and batch.to("cpu").tgt_out.shape == (2, 4)


@pytest.fixture
def corpus(tmp_path, char_tok):
    rng = np.random.default_rng(0)
    letters = list("abcdefghij")
    pairs = [("".join(rng.choice(letters, rng.integers(1, 12))),
              "".join(rng.choice(letters, rng.integers(1, 12)))) for _ in range(300)]
    return BinarizedCorpus.build(pairs, char_tok, char_tok, tmp_path / "bin")


def as_lists(batch):
    return [batch.src.tolist(), batch.tgt_in.tolist(), batch.tgt_out.tolist()]


def test_batch_iterator_resumes_exactly(corpus):
    first = BatchIterator(corpus, max_tokens=60, seed=7)
    n_epoch = len(first.epoch_batches(0))
    stream = iter(first)
    k = n_epoch - 2  # resume point close to an epoch boundary
    for _ in range(k):
        next(stream)
    state = first.state_dict()
    assert state == {"epoch": 0, "position": k}
    expected = [as_lists(next(stream)) for _ in range(5)]  # crosses into epoch 1

    resumed = BatchIterator(corpus, max_tokens=60, seed=7)
    resumed.load_state_dict(state)
    assert [as_lists(b) for _, b in zip(range(5), resumed)] == expected
    assert resumed.state_dict() == {"epoch": 1, "position": 3}


def test_batch_iterator_ranks_split_each_global_batch(corpus):
    ranks = [iter(BatchIterator(corpus, max_tokens=60, seed=7, rank=r, world_size=2))
             for r in range(2)]
    for global_batch in BatchIterator(corpus, max_tokens=60, seed=7).epoch_batches(0)[:10]:
        parts = [next(it) for it in ranks]
        assert [p.src.shape[0] for p in parts] == [len(shard(global_batch, r, 2)) for r in range(2)]
        assert sum(p.n_tgt_tokens for p in parts) == int((corpus.tgt_lengths[global_batch] + 1).sum())


def test_batch_iterator_batches_use_fixed_special_ids(corpus):
    batch = next(iter(BatchIterator(corpus, max_tokens=60, seed=0)))
    assert (batch.tgt_in[:, 0] == BOS_ID).all()
    assert ((batch.tgt_out == EOS_ID).sum(dim=1) == 1).all()
    assert batch.src.shape[0] * max(batch.src.shape[1], batch.tgt_in.shape[1]) <= 60
    assert (batch.src[:, -1].eq(EOS_ID) | batch.src[:, -1].eq(PAD_ID)).all()
