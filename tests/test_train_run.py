"""End-to-end training on a tiny random Llama: dropout views, instructions, adapters, resume, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llm2vec_fast import LLM2Vec
from llm2vec_fast.train import STAGE_CLASSES, make_config, train

CLI = "import sys; from llm2vec_fast.cli import main; sys.exit(main())"
SENTENCES = [f"sentence number {i} talks about {w}." for i, w in enumerate(["cats", "dogs", "rain", "music", "code", "tea"] * 6)]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sentences.txt"
    path.write_text("\n".join(SENTENCES) + "\n")
    return str(path)


def _cfg(stage, model, data, out, **kw):
    values = dict(
        model=model,
        data=data,
        output_dir=str(out),
        batch_size=4,
        max_length=24,
        max_steps=4,
        save_steps=2,
        progress=False,
        device="cpu",
        lr=1e-3,
    )
    values.update(kw)
    return make_config(stage, values)


def _nonzero_lora_b(stage) -> None:
    """LoRA B starts at zero (no gradient reaches A); a fixed random B makes every gradient count."""
    with torch.no_grad():
        for name, p in stage.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))


def _build(stage_name, config):
    stage = STAGE_CLASSES[stage_name](config, torch.device("cpu"))
    schedule = stage.load_data()
    torch.manual_seed(0)
    stage.build()
    stage.wrap_ddp()
    return stage, schedule


def test_simcse_views_differ_in_train_mode_only(tiny_llama_dir, text_file, tmp_path):
    stage, schedule = _build("simcse", _cfg("simcse", tiny_llama_dir, text_file, tmp_path))
    assert stage.encoder.model.config.attention_dropout == 0.3
    view1, view2 = stage.groups(schedule.batch(0))
    assert [x.input_ids for x in view1] == [x.input_ids for x in view2]
    stage.peft_model.train()
    reps = stage.embed(view1 + view2).chunk(2)
    assert not torch.allclose(reps[0], reps[1], atol=1e-4)  # independent dropout masks
    stage.peft_model.eval()
    with torch.no_grad():
        reps = stage.embed(view1 + view2).chunk(2)
    torch.testing.assert_close(reps[0], reps[1], rtol=1e-5, atol=1e-5)


def test_micro_batches_equal_one_padded_forward(tiny_llama_dir, text_file, tmp_path):
    stage, schedule = _build("simcse", _cfg("simcse", tiny_llama_dir, text_file, tmp_path, micro_batch_size=3))
    stage.peft_model.eval()
    items = stage.groups(schedule.batch(0))[0] + stage.encoder._prepare([("", "a much longer sentence " * 3)])
    with torch.no_grad():
        micro = stage.embed(items)
        whole = stage._embed_padded(items)
    torch.testing.assert_close(micro, whole, rtol=1e-5, atol=1e-5)


def test_supervised_instructions_are_not_pooled(tiny_llama_dir, tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text(
        json.dumps({"query": "q text", "instruction": "Retrieve documents", "positive": "p", "negative": "n", "dataset": "d"}) + "\n"
    )
    cfg = make_config(
        "supervised", dict(model=tiny_llama_dir, data=str(data), batch_size=1, max_length=32, device="cpu", output_dir=str(tmp_path))
    )
    stage, schedule = _build("supervised", cfg)
    queries, positives, negatives = stage.groups(schedule.batch(0))
    q = queries[0]
    n_text = len(stage.encoder.tokenizer("q text", add_special_tokens=False)["input_ids"])
    assert q.num_pooled == n_text < len(q.input_ids)  # instruction tokens attended to, not pooled
    features = stage.encoder.collate(queries)
    assert int(features["pool_mask"].sum()) == n_text and not features["pool_mask"][0, 0]
    # the pooled embedding changes with the instruction (attended) but pools only the text tokens
    stage.peft_model.eval()
    with torch.no_grad():
        with_instr = stage.embed(queries)
        no_instr = stage.embed(stage.encoder._prepare([("", "q text")]))
    assert not torch.allclose(with_instr, no_instr)


def test_mntp_adapter_loads_on_bare_decoder(tiny_causal_lm_dir, text_file, tmp_path):
    adapter = train("mntp", _cfg("mntp", tiny_causal_lm_dir, text_file, tmp_path / "mntp", mlm_probability=0.3))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == tiny_causal_lm_dir
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    # peft's prefix + the bare decoder's module names (as on AutoModel), not the causal LM's "model.layers"
    assert any(k.startswith("base_model.model.layers.0.self_attn.q_proj.lora_A") for k in keys)
    assert not any(k.startswith("base_model.model.model.") or "lm_head" in k for k in keys)
    assert (adapter / "llm2vec_config.json").is_file()
    base = LLM2Vec.from_pretrained(tiny_causal_lm_dir, device="cpu")
    tuned = LLM2Vec.from_pretrained(tiny_causal_lm_dir, peft_model_name_or_path=str(adapter), device="cpu")
    e0, e1 = base.encode(SENTENCES[:3]), tuned.encode(SENTENCES[:3])
    assert not torch.allclose(e0, e1, atol=1e-6)  # the adapter is applied
    # and it is the trained decoder: compare with the peft model the trainer saved
    from peft import PeftModel
    from transformers import AutoModel

    from llm2vec_fast.bidirectional import enable_bidirectional

    dec = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_causal_lm_dir), str(adapter)).eval()
    enable_bidirectional(dec)
    f = tuned.collate(tuned.tokenize(SENTENCES[:3]))
    with torch.no_grad():
        h = dec(input_ids=f["input_ids"], attention_mask=f["attention_mask"], position_ids=f["position_ids"]).last_hidden_state
    torch.testing.assert_close(tuned.pool(h, f["pool_mask"]), e1, rtol=1e-5, atol=1e-5)


def test_chained_adapters_mntp_then_simcse(tiny_causal_lm_dir, text_file, tmp_path):
    mntp = train("mntp", _cfg("mntp", tiny_causal_lm_dir, text_file, tmp_path / "mntp", max_steps=2))
    simcse = train(
        "simcse",
        _cfg("simcse", tiny_causal_lm_dir, text_file, tmp_path / "simcse", max_steps=2, peft=[str(mntp)], pooling_mode="weighted_mean"),
    )
    settings = json.loads((simcse / "llm2vec_config.json").read_text())
    assert settings["pooling_mode"] == "weighted_mean"
    enc = LLM2Vec.from_pretrained(tiny_causal_lm_dir, peft_model_name_or_path=[str(mntp), str(simcse)], device="cpu")
    assert enc.pooling_mode == "weighted_mean"
    only_mntp = LLM2Vec.from_pretrained(tiny_causal_lm_dir, peft_model_name_or_path=str(mntp), device="cpu")
    a, b = enc.encode(SENTENCES[:2]), only_mntp.encode(SENTENCES[:2])
    assert a.shape == (2, 64) and not torch.allclose(a, b, atol=1e-6)


def test_training_length_is_not_the_encoders_length(tiny_causal_lm_dir, text_file, tmp_path):
    """A stage trained at ``max_length: 24`` records 24 in ``train_config.json`` only: the saved
    adapters keep the inference limits (512 / 400), so later encodes do not cut documents at 24."""
    mntp = train("mntp", _cfg("mntp", tiny_causal_lm_dir, text_file, tmp_path / "mntp", max_steps=2))
    simcse = train("simcse", _cfg("simcse", tiny_causal_lm_dir, text_file, tmp_path / "simcse", max_steps=2, peft=[str(mntp)]))
    for adapter in (mntp, simcse):
        settings = json.loads((adapter / "llm2vec_config.json").read_text())
        assert (settings["max_length"], settings["doc_max_length"]) == (512, 400), adapter
        assert json.loads((adapter.parent / "train_config.json").read_text())["max_length"] == 24
    enc = LLM2Vec.from_pretrained(tiny_causal_lm_dir, peft_model_name_or_path=[str(mntp), str(simcse)], device="cpu")
    assert (enc.max_length, enc.doc_max_length) == (512, 400)
    long_text = " ".join(["word"] * 60)
    assert len(enc.tokenize([long_text])[0].input_ids) > 24
    saved = tmp_path / "saved"
    enc.save(saved)
    stored = json.loads((saved / "llm2vec_config.json").read_text())
    assert (stored["max_length"], stored["doc_max_length"]) == (512, 400)


def test_lengths_set_by_the_user_survive_training(tiny_causal_lm_dir, text_file, tmp_path):
    """Limits stored with the model (here: an encoder saved with max_length 64 / doc 50) stay the
    limits of every stage trained on it, whatever the training length."""
    base = tmp_path / "base"
    LLM2Vec.from_pretrained(tiny_causal_lm_dir, max_length=64, doc_max_length=50, device="cpu").save(base)
    mntp = train("mntp", _cfg("mntp", str(base), text_file, tmp_path / "mntp", max_steps=1))
    simcse = train("simcse", _cfg("simcse", str(base), text_file, tmp_path / "simcse", max_steps=1, peft=[str(mntp)]))
    for adapter in (mntp, simcse):
        settings = json.loads((adapter / "llm2vec_config.json").read_text())
        assert (settings["max_length"], settings["doc_max_length"]) == (64, 50), adapter


def _adapter_weights(path):
    return load_file(os.path.join(path, "adapter_model.safetensors"))


@pytest.mark.parametrize("stage", ["mntp", "simcse"])
def test_resume_is_bit_for_bit(stage, tiny_causal_lm_dir, text_file, tmp_path):
    model = tiny_causal_lm_dir
    full = train(stage, _cfg(stage, model, text_file, tmp_path / "full", max_steps=6))
    with pytest.raises(InterruptedError):
        train(stage, _cfg(stage, model, text_file, tmp_path / "cut", max_steps=6), stop_after=3)  # crash after step 3
    assert (tmp_path / "cut" / "checkpoints" / "checkpoint-2" / "trainer_state.pt").is_file()
    resumed = train(stage, _cfg(stage, model, text_file, tmp_path / "cut", max_steps=6), resume=True)
    a, b = _adapter_weights(full), _adapter_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_full = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    log_cut = [json.loads(x) for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_cut] == list(range(1, 7))
    assert [r["loss"] for r in log_cut] == [r["loss"] for r in log_full]


@pytest.mark.parametrize("stage", ["mntp", "simcse"])
def test_two_runs_of_one_seed_give_identical_adapters(stage, tiny_causal_lm_dir, text_file, tmp_path):
    """Same seed, settings, threads and versions: bit-identical adapters (what makes the shipped
    default encoder rebuildable), whatever the global RNG state before the run."""
    torch.manual_seed(1)
    a = train(stage, _cfg(stage, tiny_causal_lm_dir, text_file, tmp_path / "a", max_steps=3))
    torch.manual_seed(2)
    b = train(stage, _cfg(stage, tiny_causal_lm_dir, text_file, tmp_path / "b", max_steps=3))
    wa, wb = _adapter_weights(a), _adapter_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    other = train(stage, _cfg(stage, tiny_causal_lm_dir, text_file, tmp_path / "c", max_steps=3, seed=7))
    assert any(not torch.equal(wa[k], w) for k, w in _adapter_weights(other).items())


def test_checkpoints_rotate_and_leave_no_temp_dirs(tiny_llama_dir, text_file, tmp_path):
    train("simcse", _cfg("simcse", tiny_llama_dir, text_file, tmp_path, max_steps=7, save_steps=2, save_total_limit=2))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint-4", "checkpoint-6"]
    state = torch.load(tmp_path / "checkpoints" / "checkpoint-6" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 6 and {"optimizer", "scheduler", "rng", "trainable"} <= state.keys()
    assert (tmp_path / "checkpoints" / "checkpoint-6" / "adapter" / "adapter_config.json").is_file()


def test_a_fresh_run_drops_an_earlier_runs_checkpoints(tiny_llama_dir, text_file, tmp_path):
    """Run A leaves checkpoint-6; run B starts over in the same folder without --resume: A's
    checkpoints are gone, so B's own survive the rotation and B's --resume continues B. A checkpoint
    of another stage is refused."""
    train("simcse", _cfg("simcse", tiny_llama_dir, text_file, tmp_path, max_steps=7, save_steps=2, save_total_limit=2))
    with pytest.raises(InterruptedError):
        train("simcse", _cfg("simcse", tiny_llama_dir, text_file, tmp_path, max_steps=7, lr=5e-4), stop_after=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-2"]
    train("simcse", _cfg("simcse", tiny_llama_dir, text_file, tmp_path, max_steps=7, lr=5e-4), resume=True)
    steps = [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))
    with pytest.raises(RuntimeError, match="is of a simcse run, not mntp"):
        train("mntp", _cfg("mntp", tiny_llama_dir, text_file, tmp_path, max_steps=7), resume=True)


def test_checkpoints_of_earlier_versions_still_resume(tiny_llama_dir, text_file, tmp_path):
    """Before weights_only loading, trainer_state.pt held numpy's RNG key as an ndarray: such a
    checkpoint resumes to the same adapter."""
    import numpy as np

    from llm2vec_fast.train.trainer import read_trainer_state

    full = train("simcse", _cfg("simcse", tiny_llama_dir, text_file, tmp_path / "full", max_steps=4))
    with pytest.raises(InterruptedError):
        train("simcse", _cfg("simcse", tiny_llama_dir, text_file, tmp_path / "cut", max_steps=4), stop_after=3)
    path = tmp_path / "cut" / "checkpoints" / "checkpoint-2" / "trainer_state.pt"
    state = read_trainer_state(path)
    for rng in state["rng"]:  # the earlier layout
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        rng["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    state.pop("stage")
    torch.save(state, path)
    resumed = train("simcse", _cfg("simcse", tiny_llama_dir, text_file, tmp_path / "cut", max_steps=4), resume=True)
    a, b = _adapter_weights(full), _adapter_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_phi3_gets_lora_on_its_stacked_projections():
    from conftest import tiny_config
    from transformers import AutoModel

    from llm2vec_fast.train.trainer import add_lora

    config = make_config("mntp", {"data": __file__}, check_files=False)
    peft_model = add_lora(AutoModel.from_config(tiny_config("phi3")), config)
    targets = {name.rsplit(".", 1)[-1] for name, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert targets == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def _cli(*args, cwd=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def test_cli_train_smoke_and_resume_after_kill(tiny_llama_dir, text_file, tmp_path):
    cfg = tmp_path / "simcse.yaml"
    cfg.write_text(f"model: {tiny_llama_dir}\ndata: {text_file}\nbatch_size: 4\nmax_length: 24\nsave_steps: 2\ndevice: cpu\n")
    out = tmp_path / "run"
    r = _cli("train", "simcse", "--config", str(cfg), "--set", "max_steps=4", "--set", f"output_dir={out}", "--set", "progress=false")
    assert r.returncode == 0, r.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 3, 4] and all("tokens_per_s" in x for x in rows)
    # a run killed after its first checkpoint resumes to the same adapter
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out2 = tmp_path / "killed"
    args = [
        sys.executable,
        "-c",
        CLI,
        "train",
        "simcse",
        "--config",
        str(cfg),
        "--set",
        "max_steps=4",
        "--set",
        f"output_dir={out2}",
        "--set",
        "progress=false",
        "--set",
        "save_steps=1",
    ]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time

    deadline = time.time() + 240
    while time.time() < deadline and not (out2 / "checkpoints" / "checkpoint-2").is_dir() and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    r = _cli(
        "train",
        "simcse",
        "--config",
        str(cfg),
        "--set",
        "max_steps=4",
        "--set",
        f"output_dir={out2}",
        "--set",
        "progress=false",
        "--set",
        "save_steps=1",
        "--resume",
    )
    assert r.returncode == 0, r.stderr
    a, b = _adapter_weights(out / "adapter"), _adapter_weights(out2 / "adapter")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cli_bad_config_fails_before_work(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: /nonexistent.txt\n")
    r = _cli("train", "mntp", "--config", str(cfg))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = _cli("train", "simcse", "--set", "data=x", "--set", "batchsize=3")
    assert r.returncode == 2 and "unknown simcse config key" in r.stderr and "batch_size" in r.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    r = _cli("train", "simcse", "--set", f"data={empty}", "--set", f"output_dir={tmp_path / 'o'}")
    assert r.returncode == 2 and "no non-empty line" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def tiny_lm_head32_dir(tmp_path_factory, smollm_tokenizer):
    """Tiny causal LM with head_dim 32 (the varlen attention kernel's smallest)."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-lm-hd32")
    AutoModelForCausalLM.from_config(
        tiny_config("llama", tie_word_embeddings=True, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    ).save_pretrained(path)
    smollm_tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("stage_name", ["mntp", "supervised"])
def test_packed_batches_match_padded(stage_name, tiny_lm_head32_dir, text_file, tmp_path):
    """The packed varlen layout (the CUDA default; torch references on CPU) gives the padded loss and gradients."""
    if stage_name == "supervised":
        data = tmp_path / "t.jsonl"
        rows = [
            {
                "query": f"query {i} " * (i + 1),
                "instruction": "Find it" if i % 2 else "",
                "positive": f"doc {i}",
                "negative": "no " * i + "x",
            }
            for i in range(4)
        ]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        data_file, extra = str(data), dict(lora_dropout=0.0, attention_dropout=0.0)
    else:
        data_file, extra = text_file, dict(lora_dropout=0.0)
    results = []
    for layout in ("padded", "packed"):
        stage, schedule = _build(
            stage_name, _cfg(stage_name, tiny_lm_head32_dir, data_file, tmp_path / layout, batch_layout=layout, **extra)
        )
        _nonzero_lora_b(stage)
        loss, _ = stage.step(schedule.batch(0))
        results.append((loss.detach(), {n: p.grad.clone() for n, p in stage.trainable_parameters().items()}))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-5, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_llama_dir, text_file, tmp_path):
    grads = []
    for ckpt in (False, True):
        stage, schedule = _build(
            "simcse",
            _cfg(
                "simcse",
                tiny_llama_dir,
                text_file,
                tmp_path / str(ckpt),
                gradient_checkpointing=ckpt,
                attention_dropout=0.0,
                lora_dropout=0.0,
            ),
        )
        _nonzero_lora_b(stage)
        stage.step(schedule.batch(0))
        grads.append({n: p.grad.clone() for n, p in stage.trainable_parameters().items()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_cli_eval_sts(tiny_llama_dir):
    r = _cli("eval", "sts", "--split", "dev", "--model", tiny_llama_dir, "--limit", "40", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "STS-B dev Spearman x100:" in r.stdout
    r = _cli("eval", "sts", "--split", "dev", "--model", tiny_llama_dir, "--data-dir", "/nonexistent")
    assert r.returncode == 2 and "from data_dir (--data-dir)" in r.stderr


@pytest.mark.parametrize("stage_name", ["mntp", "simcse"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fused_layers_train_to_the_same_loss_and_gradients(stage_name, layout, tiny_lm_head32_dir, text_file, tmp_path):
    """``fused: true`` (fused norms with their residual add, RoPE; projections separate for LoRA):
    on CPU (the torch references: the models' own arithmetic) the loss and every LoRA gradient are
    the unfused run's, through our norm op's backward; with gradient checkpointing too. The adapter
    keeps the unfused module names, so it loads into a plain model."""
    from llm2vec_fast.fused_layers import FusedRMSNorm, is_fused

    results = []
    for fused in (False, True):
        config = _cfg(
            stage_name,
            tiny_lm_head32_dir,
            text_file,
            tmp_path / f"{layout}-{fused}",
            batch_layout=layout,
            fused=fused,
            gradient_checkpointing=fused,
            lora_dropout=0.0,
            **({"attention_dropout": 0.0} if stage_name == "simcse" else {}),
        )
        stage, schedule = _build(stage_name, config)
        assert is_fused(stage.peft_model) == fused
        assert (stage.fused_report is not None) == fused and (not fused or stage.fused_report["qkv_fused"] == 0)
        assert any(isinstance(m, FusedRMSNorm) for m in stage.peft_model.modules()) == fused
        _nonzero_lora_b(stage)
        loss, _ = stage.step(schedule.batch(0))
        results.append((loss.detach(), {n: p.grad.clone() for n, p in stage.trainable_parameters().items()}))
    (l1, g1), (l2, g2) = results
    assert g1.keys() == g2.keys() and len(g1) > 0
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-6)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-5, atol=1e-7, msg=name)
