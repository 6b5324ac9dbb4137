"""``benchmarks/recipe_default.py``: what it ships into the package (fp16 adapters, inference lengths,
train settings without machine paths), and that its checkpoints are those of one uninterrupted run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from llm2vec_fast import LLM2Vec
from llm2vec_fast.train import make_config, train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import recipe_default  # noqa: E402

SENTENCES = [f"sentence {i} is about {w}." for i, w in enumerate(["cats", "dogs", "rain", "music"] * 4)]


def _stage(tmp_path, name, model, data, **kw):
    values = dict(model=model, data=data, output_dir=str(tmp_path / name), batch_size=4, max_length=16, max_steps=2)
    values.update(save_steps=1, save_total_limit=0, progress=False, device="cpu", lr=1e-3, **kw)
    return values


def test_ship_writes_fp16_adapters_with_inference_lengths(tiny_causal_lm_dir, tmp_path):
    data = tmp_path / "s.txt"
    data.write_text("\n".join(SENTENCES) + "\n")
    mntp = train("mntp", make_config("mntp", _stage(tmp_path, "mntp", tiny_causal_lm_dir, str(data))))
    simcse_cfg = _stage(tmp_path, "simcse", tiny_causal_lm_dir, str(data), peft=[str(mntp)])
    curve = []
    recipe_default.train_simcse_with_curve(simcse_cfg, 1, lambda step, adapter: curve.append((step, adapter)), resume=False)
    assert [s for s, _ in curve] == [1, 2] and all((a / "adapter_model.safetensors").is_file() for _, a in curve)
    assert recipe_default.finished_adapter(simcse_cfg) == curve[-1][1]

    target = tmp_path / "shipped"
    recipe_default.ship(mntp, curve[0][1], target, {"simcse_step": 1})  # a checkpoint, not the final adapter
    for name, source in (("mntp", mntp), ("simcse", curve[0][1])):
        shipped = load_file(target / name / "adapter_model.safetensors")
        original = load_file(source / "adapter_model.safetensors")
        assert shipped.keys() == original.keys()
        assert all(v.dtype == torch.float16 and torch.equal(v, original[k].half()) for k, v in shipped.items())
        train_config = json.loads((target / name / "train_config.json").read_text())
        assert train_config["stage"] == name and train_config["max_length"] == 16 and "output_dir" not in train_config
        assert json.loads((target / name / "adapter_config.json").read_text())["base_model_name_or_path"] == "default-base"
    assert json.loads((target / "simcse" / "train_config.json").read_text())["peft"] == ["mntp"]
    settings = json.loads((target / "simcse" / "llm2vec_config.json").read_text())
    assert (settings["max_length"], settings["doc_max_length"]) == (512, 400)
    assert json.loads((target / "provenance.json").read_text()) == {"simcse_step": 1}

    enc = LLM2Vec.from_pretrained(
        tiny_causal_lm_dir, peft_model_name_or_path=[str(target / "mntp"), str(target / "simcse")], merge_peft=True, device="cpu"
    )
    ref = LLM2Vec.from_pretrained(tiny_causal_lm_dir, peft_model_name_or_path=[str(mntp), str(curve[0][1])], merge_peft=True, device="cpu")
    torch.testing.assert_close(enc.encode(SENTENCES[:3]), ref.encode(SENTENCES[:3]), rtol=1e-2, atol=1e-3)  # fp16 rounding only
