"""The helpers the chapters share (lillm.course, corpus.text_slice / split_documents, data.random_windows), on the
real TinyStories text. The artifact chain itself (tokenizer -> shards -> base -> SFT) runs in the notebook tests."""

from __future__ import annotations

import torch

from lillm import course
from lillm.corpus import read_txt, split_documents, text_slice
from lillm.data import random_windows
from lillm.model import LilLM, ModelConfig


def test_text_slice_is_a_prefix_cut_at_a_document_boundary(data_dir, tmp_path):
    source = data_dir / "pretrain_tinystories_train.txt"
    piece = text_slice(source, 50_000)
    with open(source, encoding="utf-8") as f:
        head = f.read(50_000)
    assert head.startswith(piece) and len(piece) < 50_000
    assert head[len(piece) : len(piece) + 2] == "\n\n"
    (tmp_path / "slice.txt").write_text(piece, encoding="utf-8")
    assert split_documents(piece) == list(read_txt(tmp_path / "slice.txt"))  # the same rule as the file reader


def test_random_windows_are_contiguous_and_shifted():
    tokens = torch.arange(1000)
    x, y = random_windows(tokens, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(x, x[:, :1] + torch.arange(16))  # a contiguous run of the tensor
    again = random_windows(tokens, 8, 16, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x)


def test_train_on_windows_learns_real_bytes(data_dir):
    """One thread, as in the chapters: a model this small only thrashes with two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = LilLM(ModelConfig(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, max_seq_len=32))
        tokens = course.byte_tokens("pretrain_tinystories_train.txt", 200_000)
        losses = course.train_on_windows(model, tokens, steps=60, batch_size=8, seq_len=32, lr=1e-2, seed=0, warmup_steps=5)
    finally:
        torch.set_num_threads(threads)
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < losses[0] - 1.5  # from ~ln 256 = 5.5 towards the byte statistics of English
