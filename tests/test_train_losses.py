"""Contrastive losses: InfoNCE by hand, GradCache gradient equality, DDP (gloo, 2 ranks) equality."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

from llm2vec_fast.train.losses import all_gather_with_grad, distributed_info_nce, info_nce


def test_info_nce_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    d = torch.tensor([[1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])  # 2 positives + 1 hard negative
    cos = [[1 / math.sqrt(2), 0.0, -1.0], [1 / math.sqrt(2), 1.0, 0.0]]
    expected = 0.0
    for i in range(2):
        logits = [20 * c for c in cos[i]]
        expected += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    expected /= 2
    assert info_nce(q, d, scale=20.0).item() == pytest.approx(expected, rel=1e-4)  # fp32 logsumexp


def test_distributed_info_nce_without_process_group_is_plain():
    torch.manual_seed(0)
    q, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    assert torch.equal(distributed_info_nce(q, [p, n], 20.0), info_nce(q, torch.cat([p, n]), 20.0))
    assert all_gather_with_grad(q) is q


# ------------------------------------------------------------------------------- GradCache
def _stage(model_dir, tmp_path, **overrides):
    from llm2vec_fast.train import STAGE_CLASSES, make_config

    data = tmp_path / "triplets.jsonl"
    import json

    rows = [
        {
            "query": f"what is item {i}?",
            "instruction": "Retrieve the passage" if i % 2 else "",
            "positive": f"item {i} is a thing number {i}",
            "negative": f"something unrelated {i * 7}",
            "dataset": "a",
        }
        for i in range(8)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = dict(
        model=model_dir,
        data=str(data),
        output_dir=str(tmp_path / "out"),
        batch_size=8,
        max_length=32,
        lora_dropout=0.0,
        attention_dropout=0.0,
        device="cpu",
    )
    values.update(overrides)
    stage = STAGE_CLASSES["supervised"](make_config("supervised", values), torch.device("cpu"))
    schedule = stage.load_data()
    torch.manual_seed(0)
    stage.build()
    # non-zero LoRA B so the LoRA A gradients are not trivially zero
    with torch.no_grad():
        for name, p in stage.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    stage.wrap_ddp()
    return stage, schedule


def _grads(stage):
    return {n: p.grad.clone() for n, p in stage.trainable_parameters().items()}


def test_gradcache_gives_the_plain_gradients(tiny_llama_dir, tmp_path):
    plain, schedule = _stage(tiny_llama_dir, tmp_path)
    batch = schedule.batch(0)
    loss_plain, _ = plain.step(batch)
    cached, _ = _stage(tiny_llama_dir, tmp_path, gradcache=True, gradcache_chunk_size=3)
    loss_cached, _ = cached.step(batch)
    torch.testing.assert_close(loss_cached, loss_plain.detach(), rtol=1e-5, atol=1e-6)
    g1, g2 = _grads(plain), _grads(cached)
    assert g1.keys() == g2.keys() and len(g1) > 0
    assert any(g.abs().sum() > 0 for g in g1.values())
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradcache_replays_dropout(tiny_llama_dir, tmp_path):
    """With dropout active, each chunk's re-forward (with grad) sees the same dropout masks as its
    cached pass (without grad), and the RNG ends where the cached passes left it."""
    from llm2vec_fast.train.contrastive import gradcache_backward

    stage, schedule = _stage(tiny_llama_dir, tmp_path, attention_dropout=0.3, lora_dropout=0.1)
    stage.peft_model.train()
    groups = stage.groups(schedule.batch(0))
    chunks = [g[i : i + 4] for g in groups for i in range(0, len(g), 4)]
    calls = []

    def embed(chunk):
        rep = stage.embed(chunk)
        calls.append(rep.detach().clone())
        return rep

    torch.manual_seed(123)
    gradcache_backward(embed, chunks, lambda r: stage.loss_on(r, 3), torch.device("cpu"))
    after = torch.get_rng_state()
    n = len(chunks)
    assert len(calls) == 2 * n
    for i in range(n):
        torch.testing.assert_close(calls[n + i], calls[i], rtol=0, atol=0)
    torch.manual_seed(123)
    with torch.no_grad():
        again = [stage.embed(c) for c in chunks]
    assert torch.equal(torch.get_rng_state(), after)
    torch.testing.assert_close(again[0], calls[0], rtol=0, atol=0)
    # dropout really is active: a fresh pass differs
    assert not torch.allclose(stage.embed(chunks[0]), calls[0])


# ------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, model_dir, tmp, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from pathlib import Path

        from llm2vec_fast.train.data import rank_slice

        rank_dir = Path(tmp) / f"rank{rank}"  # each rank writes its own (identical) data file: no read/write race
        rank_dir.mkdir(exist_ok=True)
        for gradcache in (False, True):
            stage, schedule = _stage(model_dir, rank_dir, gradcache=gradcache, gradcache_chunk_size=2)
            loss, _ = stage.step(rank_slice(schedule.batch(0), rank, world))
            reduced = loss.detach().clone()
            dist.all_reduce(reduced)
            torch.save({"loss": reduced / world, "grads": _grads(stage)}, os.path.join(out, f"rank{rank}-gc{int(gradcache)}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_match_single_process(tiny_llama_dir, tmp_path):
    """2 gloo ranks, each with half the batch (plain and GradCache): the mean loss equals the
    single-process loss on the whole batch, and DDP's averaged gradients equal the single-process
    gradients (negatives are all-gathered with gradients, so no extra scaling is needed)."""
    import torch.multiprocessing as mp

    single, schedule = _stage(tiny_llama_dir, tmp_path)
    loss_single, _ = single.step(schedule.batch(0))
    expected = _grads(single)
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), tiny_llama_dir, str(tmp_path), str(out)), nprocs=2, join=True)
    for rank in range(2):
        for gc in (0, 1):
            got = torch.load(out / f"rank{rank}-gc{gc}.pt")
            torch.testing.assert_close(got["loss"], loss_single.detach(), rtol=1e-5, atol=1e-6)
            for name, g in expected.items():
                torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=f"{name} gradcache={gc}")


def _train_worker(rank, world, port, model_dir, data, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1"
    )
    torch.set_num_threads(1)
    from llm2vec_fast.train import make_config, train

    cfg = make_config(
        "supervised",
        dict(
            model=model_dir,
            data=data,
            output_dir=out_dir,
            batch_size=8,
            max_length=32,
            max_steps=2,
            save_steps=1,
            lora_dropout=0.0,
            attention_dropout=0.0,
            warmup_steps=0,
            device="cpu",
            progress=False,
        ),
    )
    train("supervised", cfg)  # initialises and tears down the process group from the torchrun-style environment


def test_train_under_two_ranks_matches_one(tiny_llama_dir, tmp_path):
    """``train()`` as torchrun runs it (WORLD_SIZE=2, gloo): the adapter after 2 steps (with a
    checkpoint written by every rank at each step) matches a single-process run on the same global batches."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    from llm2vec_fast.train import make_config, train

    stage, _ = _stage(tiny_llama_dir, tmp_path)  # writes the triplets file
    data = str(tmp_path / "triplets.jsonl")
    single = train(
        "supervised",
        make_config(
            "supervised",
            dict(
                model=tiny_llama_dir,
                data=data,
                output_dir=str(tmp_path / "one"),
                batch_size=8,
                max_length=32,
                max_steps=2,
                save_steps=1,
                lora_dropout=0.0,
                attention_dropout=0.0,
                warmup_steps=0,
                device="cpu",
                progress=False,
            ),
        ),
    )
    mp.spawn(_train_worker, args=(2, _free_port(), tiny_llama_dir, data, str(tmp_path / "two")), nprocs=2, join=True)
    a = load_file(single / "adapter_model.safetensors")
    b = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    state = torch.load(tmp_path / "two" / "checkpoints" / "checkpoint-1" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
