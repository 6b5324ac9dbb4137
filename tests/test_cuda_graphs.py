"""CUDA-graph bucketing of the packed forward: buckets, padded shapes, the dummy-sequence padding, and
that padding never changes a real sequence's embedding (on CPU, where the padded batch runs eagerly
through the torch reference; the capture itself needs CUDA and runs in the GPU suite)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModel

from llm2vec_fast import LLM2Vec, enable_bidirectional
from llm2vec_fast.cuda_graphs import (
    GraphKey,
    PackedCudaGraphs,
    bucket_for,
    check_buckets,
    graph_key,
    pad_packed_batch,
    power_of_two_buckets,
)
from llm2vec_fast.fp8 import apply_fp8, fp8_unsupported_reason
from llm2vec_fast.packing import pack
from llm2vec_fast.prompting import EncodingInput


def test_buckets():
    assert power_of_two_buckets(1000) == (64, 128, 256, 512, 1024)
    assert power_of_two_buckets(64, min_tokens=50) == (64,)
    assert bucket_for(64, (64, 128)) == 64 and bucket_for(65, (64, 128)) == 128 and bucket_for(129, (64, 128)) is None
    assert check_buckets([300, 100]) == (100, 300)
    for bad in ([], [0, 8], [8, 8]):
        with pytest.raises(ValueError):
            check_buckets(bad)
    with pytest.raises(ValueError):
        power_of_two_buckets(0)


def test_graph_key():
    # 41 tokens in 4 sequences, longest 20 -> 64 tokens; 23 padding tokens in dummies of <= 32: one
    assert graph_key(41, 4, 20, (64, 128)) == GraphKey(tokens=64, sequences=8, max_seqlen=32)
    assert graph_key(64, 4, 20, (64,)) == GraphKey(64, 4, 32)  # full bucket: no dummy
    assert graph_key(100, 1, 100, (64, 128)) == GraphKey(128, 2, 128)
    assert graph_key(129, 1, 129, (64, 128)) is None
    # a 48-position model: 126 padding tokens in dummies of <= 48 tokens (not 64): three
    assert graph_key(130, 4, 40, (64, 128, 256), max_positions=48) == GraphKey(256, 8, 64)
    assert graph_key(130, 4, 40, (64, 128, 256)) == GraphKey(256, 8, 64)  # two dummies of 64
    assert graph_key(2, 1, 2, (64,), max_positions=1) == GraphKey(64, 64, 2)  # 62 dummies of one token


def _items(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [EncodingInput(torch.randint(3, 500, (n,), generator=g).tolist(), max(1, n - 2)) for n in lengths]


def test_pad_packed_batch_layout():
    features = pack(_items([7, 1, 20, 13]))
    key = GraphKey(tokens=96, sequences=8, max_seqlen=32)
    padded = pad_packed_batch(features, key, pad_token_id=2)
    # 55 padding tokens: dummies of 32 and 23, then two empty sequences
    assert padded["cu_seqlens"].tolist() == [0, 7, 8, 28, 41, 73, 96, 96, 96]
    assert padded["cu_seqlens"].dtype == torch.int32 and padded["max_seqlen"] == 32
    assert padded["input_ids"].shape == (1, 96) and padded["input_ids"][0, 41:].eq(2).all()
    assert torch.equal(padded["input_ids"][:, :41], features["input_ids"])
    assert padded["position_ids"][0, 41:].tolist() == list(range(32)) + list(range(23))
    assert not padded["pool_mask"][41:].any() and torch.equal(padded["pool_mask"][:41], features["pool_mask"])
    with pytest.raises(ValueError, match="does not fit"):
        pad_packed_batch(features, GraphKey(tokens=96, sequences=5, max_seqlen=32), 2)
    with pytest.raises(ValueError, match="does not fit"):
        pad_packed_batch(features, GraphKey(tokens=32, sequences=8, max_seqlen=32), 2)


def test_dummies_stay_within_the_position_table(smollm_tokenizer):
    """Dynamic RoPE rescales every sequence's frequencies once a position passes
    ``max_position_embeddings``: dummy sequences must not reach past it (48 here; 64 without the cap)."""
    torch.manual_seed(0)
    config = tiny_config(
        "llama", vocab_size=49152, hidden_size=128, head_dim=32, max_position_embeddings=48,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    )  # fmt: skip
    encoder = LLM2Vec(enable_bidirectional(AutoModel.from_config(config).eval()), smollm_tokenizer, packed=True)
    features = pack(_items([40, 40, 40, 10]))
    graphs = PackedCudaGraphs(encoder)
    key = graph_key(130, 4, 40, graphs.buckets, graphs.max_positions)
    padded = pad_packed_batch(features, key, 2, graphs.max_positions)
    assert graphs.max_positions == 48 and int(padded["position_ids"].max()) == 47
    with torch.inference_mode():
        torch.testing.assert_close(graphs(features), encoder.forward_packed(features), atol=1e-6, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_encoder(smollm_tokenizer):
    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=49152, hidden_size=128, head_dim=32)
    return LLM2Vec(enable_bidirectional(AutoModel.from_config(config).eval()), smollm_tokenizer, packed=True)


@pytest.mark.parametrize("lengths", [[7, 1, 20, 13], [64], [3] * 30, [100, 5]])
def test_padding_does_not_change_embeddings(tiny_encoder, lengths):
    features = pack(_items(lengths))
    graphs = PackedCudaGraphs(tiny_encoder, buckets=[64, 128, 256])
    with torch.inference_mode():
        ref = tiny_encoder.forward_packed(features)
        got = graphs(features)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert graphs.captured == ()  # CPU: the padded batch ran eagerly, nothing captured


def test_encoder_use_cuda_graphs(tiny_encoder):
    texts = ["A man is playing a guitar.", "x", "The quick brown fox jumps over the lazy dog."] * 3
    plain = tiny_encoder.encode(texts, convert_to_tensor=True)
    tiny_encoder.use_cuda_graphs([64, 256])
    try:
        torch.testing.assert_close(tiny_encoder.encode(texts, convert_to_tensor=True), plain, atol=1e-6, rtol=1e-6)
    finally:
        tiny_encoder.cuda_graphs = None


def _fused_cuda_encoder(tokenizer) -> LLM2Vec:
    from llm2vec_fast.fused_layers import fuse_decoder

    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=49152, hidden_size=128, head_dim=32)
    model = enable_bidirectional(AutoModel.from_config(config).eval()).to("cuda", torch.bfloat16)
    fuse_decoder(model)
    return LLM2Vec(model, tokenizer, packed=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_gpu_graph_replay_matches_eager(smollm_tokenizer):
    """Captured once per padded shape, replayed for the next batch of that shape: the same embeddings
    as the eager packed forward (bf16, fused layers)."""
    encoder = _fused_cuda_encoder(smollm_tokenizer)
    graphs = encoder.use_cuda_graphs([64, 128, 256])
    with torch.inference_mode():
        for seed, lengths in enumerate(([7, 1, 20, 13], [9, 2, 18, 11], [100, 5])):  # 2nd: same key as the 1st
            features = pack(_items(lengths, seed), "cuda")
            torch.testing.assert_close(graphs(features), encoder.forward_packed(features), atol=2e-2, rtol=2e-2)
    assert len(graphs.captured) == 2


@pytest.mark.skipif(fp8_unsupported_reason("cuda") is not None, reason="needs a CUDA GPU of compute capability 8.9+")
def test_gpu_fp8_graph_replay_matches_eager(smollm_tokenizer):
    """FP8 layers fed by the fused norm and SwiGLU kernels capture too (no host sync in the dynamic
    activation scales): replays equal the eager FP8 packed forward."""
    encoder = _fused_cuda_encoder(smollm_tokenizer)
    apply_fp8(encoder, "fp8", high_precision_layers=[], rounding="nearest")
    graphs = encoder.use_cuda_graphs([64, 128])
    with torch.inference_mode():
        for seed, lengths in enumerate(([7, 1, 20, 13], [9, 2, 18, 11])):  # the same key: capture, then replay
            features = pack(_items(lengths, seed), "cuda")
            torch.testing.assert_close(graphs(features), encoder.forward_packed(features), atol=2e-2, rtol=2e-2)
    assert len(graphs.captured) == 1
