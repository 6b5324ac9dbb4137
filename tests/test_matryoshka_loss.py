"""Matryoshka training: the contrastive loss summed over embedding prefixes (sentence-transformers'
``MatryoshkaLoss``), its config options, and its use by the SimCSE / supervised stages."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llm2vec_fast.train import STAGE_CLASSES, make_config
from llm2vec_fast.train.config import ConfigError, load_config
from llm2vec_fast.train.losses import info_nce, matryoshka_loss

SENTENCES = [f"sentence {i} is about {w}." for i, w in enumerate(["cats", "dogs", "rain", "music", "tea", "code"] * 4)]


def _reference(q, d, dims, weights, scale=20.0):
    """Hand-written InfoNCE of each prefix, weighted and summed (float64)."""
    total = torch.zeros((), dtype=torch.float64)
    for k, w in zip(dims, weights):
        qk, dk = q[:, :k].double(), d[:, :k].double()
        scores = scale * (qk / qk.norm(dim=1, keepdim=True)) @ (dk / dk.norm(dim=1, keepdim=True)).T
        total += w * F.cross_entropy(scores, torch.arange(q.shape[0]))
    return total


@pytest.mark.parametrize("n,dim", [(5, 16), (97, 64), (33, 200)])
def test_sum_over_prefixes_matches_hand_computation(n, dim):
    torch.manual_seed(n)
    q, d = torch.randn(n, dim), torch.randn(2 * n, dim)  # positives then hard negatives
    dims = sorted({max(1, dim // 8), dim // 4, dim // 2, dim})
    weights = [1.0, 0.5, 2.0, 1.5][: len(dims)]
    loss = matryoshka_loss(lambda r: info_nce(r[:n], r[n:]), torch.cat([q, d]), dims, weights)
    torch.testing.assert_close(loss.double(), _reference(q, d, dims, weights), rtol=1e-5, atol=1e-6)
    plain = matryoshka_loss(lambda r: info_nce(r[:n], r[n:]), torch.cat([q, d]), [], None)
    torch.testing.assert_close(plain, info_nce(q, d))
    default_weights = matryoshka_loss(lambda r: info_nce(r[:n], r[n:]), torch.cat([q, d]), dims, None)
    torch.testing.assert_close(default_weights.double(), _reference(q, d, dims, [1.0] * len(dims)), rtol=1e-5, atol=1e-6)


def _tiny_sentence_transformer(dim: int):
    """A real ``SentenceTransformer`` built offline through public API only: a word-level
    tokenizer over a few words and a ``StaticEmbedding`` (mean of per-token vectors) of random float64
    weights, so both losses see identical, differentiable embeddings."""
    tokenizers = pytest.importorskip("tokenizers")
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    words = "cats dogs rain music tea code sun sea".split()
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    module = StaticEmbedding(tokenizer, embedding_weights=torch.randn(len(words) + 1, dim, dtype=torch.float64))
    return st.SentenceTransformer(modules=[module], device="cpu"), words


def test_equals_sentence_transformers_matryoshka_loss_over_mnrl():
    """sentence-transformers' own ``MatryoshkaLoss(MultipleNegativesRankingLoss)``, driven through a
    real tiny ``SentenceTransformer`` on (anchor, positive, hard negative) columns: same weights, same
    prefixes, each normalised after truncation; the loss and its gradients on the model's weights equal
    ours computed from the same model's embeddings."""
    from sentence_transformers.sentence_transformer import losses as st_losses

    model, words = _tiny_sentence_transformer(40)
    rng = torch.Generator().manual_seed(1)
    columns = [[" ".join(words[j] for j in torch.randint(len(words), (3,), generator=rng)) for _ in range(6)] for _ in range(3)]
    features = [model.preprocess(column) for column in columns]
    weights_param = next(p for p in model.parameters() if p.requires_grad)
    dims, weights = [8, 16, 40], [1.0, 0.5, 2.0]

    loss = st_losses.MatryoshkaLoss(model, st_losses.MultipleNegativesRankingLoss(model, scale=20.0), dims, matryoshka_weights=weights)
    theirs = loss([dict(f) for f in features], None)
    (their_grad,) = torch.autograd.grad(theirs, weights_param)

    reps = torch.cat([model(dict(f))["sentence_embedding"] for f in features])
    assert reps.dtype == torch.float64 and reps.shape == (18, 40)
    ours = matryoshka_loss(lambda r: info_nce(r[:6], r[6:], 20.0), reps, dims, weights)
    (our_grad,) = torch.autograd.grad(ours, weights_param)
    assert their_grad.abs().sum() > 0
    # our InfoNCE scores in float32 whatever the embedding dtype: float32 tolerances
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-4, atol=1e-6)


def test_gradient_reaches_only_the_trained_prefixes():
    torch.manual_seed(0)
    reps = torch.randn(12, 32, requires_grad=True)
    matryoshka_loss(lambda r: info_nce(r[:6], r[6:]), reps, [8, 16], None).backward()
    assert reps.grad[:, :16].abs().sum() > 0
    assert reps.grad[:, 16:].abs().sum() == 0  # dims past the largest prefix are not trained
    reps.grad = None
    matryoshka_loss(lambda r: info_nce(r[:6], r[6:]), reps, [8, 32], None).backward()
    assert (reps.grad[:, 8:16].abs().sum() > 0) and (reps.grad[:, 16:].abs().sum() > 0)


def test_bad_loss_arguments():
    reps = torch.randn(4, 8)
    with pytest.raises(ValueError, match="exceed the embedding dimension 8"):
        matryoshka_loss(lambda r: info_nce(r[:2], r[2:]), reps, [4, 16], None)
    with pytest.raises(ValueError, match="2 entries for 1"):
        matryoshka_loss(lambda r: info_nce(r[:2], r[2:]), reps, [4], [1.0, 1.0])


def test_config_options(tmp_path):
    data = tmp_path / "s.txt"
    data.write_text("\n".join(SENTENCES))
    cfg = load_config("simcse", None, [f"data={data}", "matryoshka_dims=[16, 32, 64]", "matryoshka_weights=[1, 0.5, 1]"])
    assert cfg.matryoshka_dims == [16, 32, 64] and cfg.matryoshka_weights == [1.0, 0.5, 1.0]
    assert load_config("supervised", None, [f"data={data}", "matryoshka_dims=64"], check_files=False).matryoshka_dims == [64]
    assert make_config("simcse", {"data": str(data)}).matryoshka_dims == []
    bad = [
        ({"matryoshka_dims": [16, "x"]}, "list of ints"),
        ({"matryoshka_dims": [16, 2.5]}, "list of ints"),
        ({"matryoshka_dims": [0, 16]}, "positive integers"),
        ({"matryoshka_dims": [16, 16]}, "duplicates"),
        ({"matryoshka_dims": [16, 32], "matryoshka_weights": [1.0]}, "one weight per"),
        ({"matryoshka_dims": [16], "matryoshka_weights": [-1.0]}, "positive"),
    ]
    for values, message in bad:
        with pytest.raises(ConfigError, match=message):
            make_config("simcse", dict(values, data=str(data)))
    with pytest.raises(ConfigError, match="unknown mntp config key"):
        make_config("mntp", {"data": str(data), "matryoshka_dims": [16]})


def _stage(model_dir, tmp_path, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "s.txt"
    data.write_text("\n".join(SENTENCES))
    values = dict(
        model=model_dir,
        data=str(data),
        output_dir=str(tmp_path / "out"),
        batch_size=6,
        max_length=24,
        max_steps=2,
        progress=False,
        device="cpu",
        attention_dropout=0.0,
        lora_dropout=0.0,
    )
    values.update(kw)
    stage = STAGE_CLASSES["simcse"](make_config("simcse", values), torch.device("cpu"))
    schedule = stage.load_data()
    torch.manual_seed(0)
    stage.build()
    stage.wrap_ddp()
    return stage, schedule


def test_simcse_stage_sums_the_prefix_losses(tiny_llama_dir, tmp_path):
    stage, schedule = _stage(tiny_llama_dir, tmp_path, matryoshka_dims=[16, 32, 64], matryoshka_weights=[1.0, 1.0, 0.5])
    groups = stage.groups(schedule.batch(0))
    with torch.no_grad():
        reps = stage.embed([x for g in groups for x in g])
        q, d = reps.chunk(2)
        expected = _reference(q, d, [16, 32, 64], [1.0, 1.0, 0.5], stage.config.loss_scale)
        torch.testing.assert_close(stage.loss_on(reps, 2).double(), expected, rtol=1e-5, atol=1e-6)
    loss, _ = stage.step(schedule.batch(0))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)


def test_gradcache_with_matryoshka_gives_the_plain_gradients(tiny_llama_dir, tmp_path):
    plain, schedule = _stage(tiny_llama_dir, tmp_path / "a", matryoshka_dims=[16, 64])
    loss_plain, _ = plain.step(schedule.batch(0))
    cached, _ = _stage(tiny_llama_dir, tmp_path / "b", matryoshka_dims=[16, 64], gradcache=True, gradcache_chunk_size=4)
    loss_cached, _ = cached.step(schedule.batch(0))
    torch.testing.assert_close(loss_cached, loss_plain.detach(), rtol=1e-5, atol=1e-6)
    g1 = {n: p.grad for n, p in plain.trainable_parameters().items()}
    g2 = {n: p.grad for n, p in cached.trainable_parameters().items()}
    assert any(g.abs().sum() > 0 for g in g1.values())
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)


def test_dims_larger_than_the_model_fail_at_build(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="exceed the model's hidden size 64"):
        _stage(tiny_llama_dir, tmp_path, matryoshka_dims=[32, 128])
