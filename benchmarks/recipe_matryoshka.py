"""Matryoshka SimCSE: STS-B dev Spearman of the recipe's MNTP + SimCSE encoder at 64 / 128 / 256 /
full dimensions, trained with the plain SimCSE loss and with the loss summed over those prefixes
(``matryoshka_dims``, as sentence-transformers' ``MatryoshkaLoss``). Same settings as
``benchmarks/recipe_sts.py`` otherwise (SmolLM2-135M-Instruct, STS-B train sentences, labels unused).

    OMP_NUM_THREADS=2 python benchmarks/recipe_matryoshka.py        # writes benchmarks/results/recipe_matryoshka.json

Reuse adapters trained earlier with ``--mntp-adapter`` and ``--plain-simcse-adapter`` (e.g. those
of ``recipe_sts.py``); missing stages are trained here under ``--run-dir`` (git-ignored ``runs/``).
Accuracy only: no timing is reported, so a busy machine is fine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from recipe_sts import recipe_stage_configs  # noqa: E402

DEFAULT_DIMS = (64, 128, 256)


def dev_scores_by_dim(encoder, dims: list[int | None], limit: int | None) -> dict[str, float]:
    """STS-B dev Spearman x 100 of each Matryoshka prefix (``None``: all dimensions), from one encoding."""
    from llm2vec_fast.stsb import load_stsb, pair_cosines, spearman

    pairs = load_stsb("dev")[:limit] if limit else load_stsb("dev")
    unique = list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))
    emb = encoder.encode(unique, batch_size=64, convert_to_numpy=True, show_progress_bar=True)
    index = {s: i for i, s in enumerate(unique)}
    gold = [g for _, _, g in pairs]
    out = {}
    for d in dims:
        # cosine of the prefix: pair_cosines normalises after truncation, as encode(truncate_dim=d) does
        sub = emb[:, :d] if d else emb
        out[str(d or "full")] = 100 * spearman(pair_cosines(lambda xs: sub[[index[x] for x in xs]], pairs), gold)
    return out


def markdown_table(result: dict) -> str:
    """README table of a results JSON: Spearman by dimension, and % of the full-dimension score."""
    scores, kept = result["stsb_dev_spearman"], result["percent_of_full_dimension_score"]
    dims = [k for k in next(iter(scores.values())) if k != "full"]
    head = "| SimCSE loss | " + " | ".join(f"{d} dims" for d in dims) + f" | full ({result['hidden_size']}) |"
    rows = [head, "|---" * (len(dims) + 2) + "|"]
    for name, s in scores.items():
        cells = [f"{s[d]:.1f} ({kept[name][d]:.0f} %)" for d in dims]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {s['full']:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/recipe_matryoshka.json"))
    p.add_argument("--run-dir", default=str(ROOT / "runs/recipe_matryoshka"))
    p.add_argument("--mntp-adapter", default=None, help="reuse this MNTP adapter (default: train it as recipe_sts.py does)")
    p.add_argument("--plain-simcse-adapter", default=None, help="reuse this plain SimCSE adapter (trained on --mntp-adapter with the same settings)")
    p.add_argument("--matryoshka-simcse-adapter", default=None, help="reuse this Matryoshka SimCSE adapter (skip its training)")
    p.add_argument("--dims", default=",".join(map(str, DEFAULT_DIMS)), help="prefix sizes below the full dimension (default 64,128,256)")
    p.add_argument("--dev-limit", type=int, default=None, help="evaluate on the first N dev pairs (default: all 1500)")
    p.add_argument("--resume", action="store_true", help="continue interrupted training from its checkpoints")
    p.add_argument("--train-only", action="store_true", help="train the missing adapters, skip the evaluation")
    p.add_argument("--only", choices=("plain", "matryoshka"), default=None, help="train and evaluate one of the two adapters (write its scores to --out)")
    p.add_argument("--reuse-scores", default=None, help="JSON of earlier scores by adapter name ({'plain': {...}}): not re-evaluated")
    p.add_argument("--table", action="store_true", help="print the README table of --out and exit")
    p.add_argument("--note", default=None, help="free text recorded in the JSON (e.g. which checkpoints were compared)")
    args, recipe_args = p.parse_known_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.out).read_text())))
        return 0
    recipe = recipe_stage_configs(recipe_args)  # recipe_sts.py's stage settings (--simcse-steps, --seed, ...)

    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.default_model import DEFAULT_MODEL_NAME
    from llm2vec_fast.train import make_config, train

    dims = sorted(int(d) for d in args.dims.split(",") if d)
    run = Path(args.run_dir)
    start = time.perf_counter()
    hidden = LLM2Vec.from_pretrained(None, device="cpu").hidden_size
    if any(d >= hidden for d in dims):
        raise SystemExit(f"--dims must be below the hidden size {hidden}")
    matryoshka_dims = dims + [hidden]

    def log(msg):
        print(f"[{(time.perf_counter() - start) / 60:6.1f} min] {msg}", flush=True)

    adapters = {}
    mntp = args.mntp_adapter
    if mntp is None:
        mntp = str(train("mntp", make_config("mntp", dict(recipe["mntp"], output_dir=str(run / "mntp"))), resume=args.resume))
        log(f"MNTP adapter: {mntp}")
    simcse = dict(recipe["simcse"], peft=[mntp])
    # --only X trains (and evaluates) X alone, so the two runs can go in parallel processes
    if args.only in (None, "plain"):
        adapters["plain"] = args.plain_simcse_adapter or str(
            train("simcse", make_config("simcse", dict(simcse, output_dir=str(run / "simcse"))), resume=args.resume)
        )
        log(f"plain SimCSE adapter: {adapters['plain']}")
    if args.only in (None, "matryoshka"):
        adapters["matryoshka"] = args.matryoshka_simcse_adapter or str(
            train(
                "simcse",
                make_config("simcse", dict(simcse, output_dir=str(run / "simcse_matryoshka"), matryoshka_dims=matryoshka_dims)),
                resume=args.resume,
            )
        )
        log(f"Matryoshka SimCSE adapter: {adapters['matryoshka']}")
    if args.train_only:
        return 0

    scores = json.loads(Path(args.reuse_scores).read_text()) if args.reuse_scores else {}
    for name, adapter in adapters.items():
        if name in scores or (args.only and name != args.only):
            continue
        encoder = LLM2Vec.from_pretrained(None, peft_model_name_or_path=[mntp, adapter], device="cpu")
        scores[name] = {k: round(v, 2) for k, v in dev_scores_by_dim(encoder, dims + [None], args.dev_limit).items()}
        log(f"{name}: {scores[name]}")
    if args.only:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(scores, indent=2) + "\n")
        return 0
    retained = {
        name: {str(d): round(100 * s[str(d)] / s["full"], 1) for d in dims} for name, s in scores.items()
    }
    out = {
        "model": f"HuggingFaceTB/{DEFAULT_MODEL_NAME}",
        "hidden_size": hidden,
        "training": {
            "mntp": mntp,
            "simcse": {k: v for k, v in recipe["simcse"].items() if k != "output_dir"},
            "matryoshka_dims": matryoshka_dims,
            "matryoshka_weights": "1 each (sum of the InfoNCE losses of each prefix)",
            "adapters": adapters,
        },
        "eval": {"split": "dev", "pairs": args.dev_limit or 1500, "pooling": "mean", "metric": "Spearman x 100 of cosine"},
        "stsb_dev_spearman": scores,
        "percent_of_full_dimension_score": retained,
        "note": args.note,
        "minutes": round((time.perf_counter() - start) / 60, 1),
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
