"""Proof that the training recipe works: STS-B dev Spearman of the default model (SmolLM2-135M-
Instruct) as a causal encoder, as an untrained bidirectional encoder, after MNTP, and after MNTP
then unsupervised SimCSE, trained on the unlabeled sentences of STS-B train (labels unused).

    OMP_NUM_THREADS=2 python benchmarks/recipe_sts.py            # writes benchmarks/results/recipe_sts.json

Adapters go to ``runs/recipe_sts/`` (git-ignored); a fixed seed reproduces them from scratch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from portable_paths import portable_path  # noqa: E402


def embed_all_modes(encoder, sentences: list[str], modes: list[str], batch_size: int = 64) -> dict[str, np.ndarray]:
    """Embeddings of ``sentences`` under several pooling modes from one forward pass per batch."""
    items = encoder.tokenize(sentences)
    out = {m: np.zeros((len(items), encoder.hidden_size), dtype=np.float32) for m in modes}
    order = sorted(range(len(items)), key=lambda i: -len(items[i].input_ids))
    encoder.eval()
    saved = encoder.pooling_mode
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            f = encoder.collate([items[i] for i in idx])
            hidden = encoder.model(
                input_ids=f["input_ids"], attention_mask=f["attention_mask"], position_ids=f["position_ids"]
            ).last_hidden_state
            for m in modes:
                encoder.pooling_mode = m
                out[m][idx] = encoder.pool(hidden, f["pool_mask"]).float().numpy()
    encoder.pooling_mode = saved
    return out


def dev_scores(encoder, modes: list[str], limit: int | None) -> dict[str, float]:
    from llm2vec_fast.stsb import load_stsb, pair_cosines, spearman

    pairs = load_stsb("dev")[:limit] if limit else load_stsb("dev")
    unique = list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))
    embs = embed_all_modes(encoder, unique, modes)
    index = {s: i for i, s in enumerate(unique)}
    gold = [g for _, _, g in pairs]
    return {m: 100 * spearman(pair_cosines(lambda xs: embs[m][[index[x] for x in xs]], pairs), gold) for m in modes}


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    """The training settings of the recipe (shared with ``recipe_matryoshka.py``)."""
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-length", type=int, default=48, help="99 %% of STS-B train sentences fit in 43 tokens")
    p.add_argument("--mntp-steps", type=int, default=30)
    p.add_argument("--mntp-batch", type=int, default=32)
    p.add_argument("--mntp-lr", type=float, default=3e-4)
    p.add_argument("--simcse-steps", type=int, default=150)
    p.add_argument("--simcse-batch", type=int, default=32)
    p.add_argument("--simcse-lr", type=float, default=5e-4)
    p.add_argument("--mntp-lora-layers", type=int, default=0, help="MNTP: LoRA on the last N layers only (0: all layers)")
    p.add_argument(
        "--simcse-lora-layers", type=int, default=0, help="SimCSE: LoRA on the last N layers only (0: all); no backward below them"
    )
    p.add_argument(
        "--quantization-aware",
        choices=("off", "simcse", "mntp+simcse"),
        default="off",
        help="train these stages through the int8 export's rounding (quantization_aware: int8; docs/training.md)",
    )
    p.add_argument(
        "--quantization-aware-weight-bits",
        type=int,
        choices=(7, 8),
        default=None,
        help="int8 weight bits simulated (default: what the export picks on this CPU; match the export's --int8-weights)",
    )


def stage_configs(args: argparse.Namespace, run: Path | None = None) -> dict[str, dict]:
    """``{"mntp": ..., "simcse": ...}`` training options of the recipe (``output_dir`` under ``run``)."""
    run = Path(run or ".")
    common = dict(data="stsb:train", seed=args.seed, max_length=args.max_length, save_steps=10, progress=True)
    stages = {
        "mntp": dict(
            common,
            max_steps=args.mntp_steps,
            batch_size=args.mntp_batch,
            lr=args.mntp_lr,
            lora_layers=args.mntp_lora_layers or None,
            output_dir=str(run / "mntp"),
        ),
        "simcse": dict(
            common,
            max_steps=args.simcse_steps,
            batch_size=args.simcse_batch,
            lr=args.simcse_lr,
            lora_layers=args.simcse_lora_layers or None,
            output_dir=str(run / "simcse"),
        ),
    }
    if args.quantization_aware != "off":  # keys only when on: the recorded configs of plain runs stay as they were
        from llm2vec_fast.export.cpu_int8 import int8_weight_bits

        bits = args.quantization_aware_weight_bits or int8_weight_bits("auto")  # recorded resolved
        for name in args.quantization_aware.split("+"):
            stages[name].update(quantization_aware="int8", quantization_aware_weight_bits=bits)
    return stages


def recipe_stage_configs(argv: list[str] | None = None) -> dict[str, dict]:
    """Stage options from recipe arguments (``--simcse-steps 150 ...``; defaults when empty)."""
    p = argparse.ArgumentParser(prog="recipe settings")
    add_recipe_args(p)
    return stage_configs(p.parse_args(argv or []))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/recipe_sts.json"))
    p.add_argument("--run-dir", default=str(ROOT / "runs/recipe_sts"))
    add_recipe_args(p)
    p.add_argument("--dev-limit", type=int, default=None, help="evaluate on the first N dev pairs (default: all 1500)")
    p.add_argument("--resume", action="store_true", help="continue interrupted training stages from their checkpoints")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: causal,bidir,mntp (tuning runs)")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.default_model import DEFAULT_MODEL_NAME
    from llm2vec_fast.train import make_config, train

    skip = set(filter(None, args.skip.split(",")))
    run = Path(args.run_dir)
    stages = stage_configs(args, run)  # what training uses
    config = {
        "training_text": "unique sentences of STS-B train (labels unused)",
        # output folders as the results file records them (repo-relative; never this machine's paths)
        **{stage: dict(c, output_dir=portable_path(c["output_dir"])) for stage, c in stages.items()},
        "eval": {"split": "dev", "pairs": args.dev_limit or 1500, "pooling": "mean (trained models)"},
    }
    results: dict[str, float] = {}
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def write(complete: bool) -> dict:
        out = {
            "model": f"HuggingFaceTB/{DEFAULT_MODEL_NAME}",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": config,
            "minutes": (time.perf_counter() - start) / 60,
            "complete": complete,
            "timings_min": timings,
            "torch_threads": torch.get_num_threads(),
            "stsb_dev_spearman": {k: round(v, 2) for k, v in results.items()},
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        return out

    def log(msg):
        print(f"[{(time.perf_counter() - start) / 60:6.1f} min] {msg}", flush=True)
        write(complete=False)

    if "causal" not in skip:
        enc = LLM2Vec.from_pretrained("default-base", enable_bidirectional=False, device="cpu")
        s = dev_scores(enc, ["mean", "weighted_mean"], args.dev_limit)
        results["causal_mean"], results["causal_weighted_mean"] = s["mean"], s["weighted_mean"]
        log(f"causal: {s}")
    if "bidir" not in skip:
        enc = LLM2Vec.from_pretrained("default-base", device="cpu")
        results["bidir_untrained"] = dev_scores(enc, ["mean"], args.dev_limit)["mean"]
        log(f"bidir untrained: {results['bidir_untrained']:.2f}")
    chain = []
    if "mntp" not in skip:
        t = time.perf_counter()
        mntp = train("mntp", make_config("mntp", stages["mntp"]), resume=args.resume)
        timings["mntp_train_min"] = (time.perf_counter() - t) / 60
        chain.append(str(mntp))
        enc = LLM2Vec.from_pretrained("default-base", peft_model_name_or_path=chain, device="cpu")
        results["mntp"] = dev_scores(enc, ["mean"], args.dev_limit)["mean"]
        log(f"mntp: {results['mntp']:.2f}")
    t = time.perf_counter()
    simcse = train("simcse", make_config("simcse", dict(stages["simcse"], peft=chain)), resume=args.resume)
    timings["simcse_train_min"] = (time.perf_counter() - t) / 60
    enc = LLM2Vec.from_pretrained("default-base", peft_model_name_or_path=chain + [str(simcse)], device="cpu")
    key = "mntp_simcse" if chain else "simcse"
    results[key] = dev_scores(enc, ["mean"], args.dev_limit)["mean"]
    log(f"{key}: {results[key]:.2f}")

    out = write(complete=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
