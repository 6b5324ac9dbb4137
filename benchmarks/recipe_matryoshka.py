"""Matryoshka SimCSE: STS-B dev Spearman of the recipe's MNTP + SimCSE encoder at 64 / 128 / 256 /
full dimensions, trained with the plain SimCSE loss and with the loss summed over those prefixes
(``matryoshka_dims``, as sentence-transformers' ``MatryoshkaLoss``). Same settings as
``benchmarks/recipe_sts.py`` otherwise (SmolLM2-135M-Instruct, STS-B train sentences, labels unused).

    OMP_NUM_THREADS=2 python benchmarks/recipe_matryoshka.py        # writes benchmarks/results/recipe_matryoshka.json

Reuse adapters trained earlier with ``--mntp-adapter`` and ``--plain-simcse-adapter`` (e.g. those
of ``recipe_sts.py``); missing stages are trained here under ``--run-dir`` (git-ignored ``runs/``).
Accuracy only: no timing is reported, so a busy machine is fine.

Besides the prefixes, each model is scored on ``d`` coordinates drawn at random (control): a
Matryoshka prefix should beat them, a plain model's prefix should not. The two trainings can run in
parallel, one thread each, then be combined without re-evaluating::

    for n in plain matryoshka; do OMP_NUM_THREADS=1 python benchmarks/recipe_matryoshka.py --mntp-adapter M \
        --dims 16,32,64,128,256 --simcse-steps 150 --only $n --out runs/scores_$n.json & done; wait
    python -c "import json; a, b = (json.load(open(f'runs/scores_{n}.json')) for n in ('plain', 'matryoshka')); \
        json.dump({k: {**a[k], **b[k]} for k in a}, open('runs/scores.json', 'w'))"
    python benchmarks/recipe_matryoshka.py --mntp-adapter M --dims 16,32,64,128,256 --simcse-steps 150 \
        --plain-simcse-adapter runs/recipe_matryoshka/simcse/adapter \
        --matryoshka-simcse-adapter runs/recipe_matryoshka/simcse_matryoshka/adapter --reuse-scores runs/scores.json
    python benchmarks/readme_results.py     # README table from the JSON
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

from portable_paths import portable_path  # noqa: E402
from recipe_sts import recipe_stage_configs  # noqa: E402

DEFAULT_DIMS = (64, 128, 256)


def encode_dev(encoder, limit: int | None, save: Path | None = None):
    """Float embeddings of the unique STS-B dev sentences, the pairs and the sentence index."""
    from llm2vec_fast.stsb import load_stsb

    pairs = load_stsb("dev")[:limit] if limit else load_stsb("dev")
    unique = list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))
    emb = encoder.encode(unique, batch_size=64, convert_to_numpy=True, show_progress_bar=True)
    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        np.save(save, emb)
    return emb, pairs, {s: i for i, s in enumerate(unique)}


def spearman_of_columns(emb: np.ndarray, pairs, index: dict, columns) -> float:
    """STS-B Spearman x 100 of the cosine over ``columns`` of the embeddings (normalised after
    selecting them, as ``encode(truncate_dim=d, normalize_embeddings=True)``)."""
    from llm2vec_fast.stsb import pair_cosines, spearman

    sub = emb[:, columns]
    return 100 * spearman(pair_cosines(lambda xs: sub[[index[x] for x in xs]], pairs), [g for _, _, g in pairs])


def dev_scores_by_dim(emb: np.ndarray, pairs, index: dict, dims: list[int | None]) -> dict[str, float]:
    """Spearman of each Matryoshka prefix (``None``: all dimensions)."""
    return {str(d or "full"): spearman_of_columns(emb, pairs, index, slice(0, d)) for d in dims}


def prefix_norm_share(emb: np.ndarray, dims: list[int]) -> dict[str, float]:
    """Mean share (%) of each embedding's squared norm held by its first ``d`` coordinates
    (``100 * d / D`` if the norm were spread evenly), and the 5 coordinates of largest mean square:
    a few outlier coordinates that dominate the cosine make truncation look harmless or even help."""
    sq = emb.astype(np.float64) ** 2
    total = sq.sum(1)
    out: dict = {str(d): round(float(100 * np.mean(sq[:, :d].sum(1) / total)), 1) for d in dims}
    top = np.argsort(-sq.mean(0))[:5]
    out["top_coordinates"] = [{"index": int(i), "share_of_squared_norm_%": round(float(100 * np.mean(sq[:, i] / total)), 1)} for i in top]
    return out


def random_dims_scores(emb: np.ndarray, pairs, index: dict, dims: list[int], draws: int = 5, seed: int = 0) -> dict[str, float]:
    """Control: mean Spearman of ``d`` coordinates drawn at random (``draws`` draws). A prefix that
    beats random coordinates of the same size was trained to carry more; plain training gives
    prefixes no special role, so there the two should be close."""
    rng = np.random.default_rng(seed)
    out = {}
    for d in dims:
        cols = [np.sort(rng.choice(emb.shape[1], d, replace=False)) for _ in range(draws)]
        out[str(d)] = float(np.mean([spearman_of_columns(emb, pairs, index, c) for c in cols]))
    return out


TRAINING_KEYS = ("max_steps", "batch_size", "lr", "max_length", "seed", "lora_layers", "matryoshka_dims", "matryoshka_weights")


def adapter_training(adapter: str) -> dict | None:
    """The settings an adapter was trained with (``train_config.json`` of its run), or ``None``."""
    path = Path(adapter).parent / "train_config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return {k: config.get(k) for k in TRAINING_KEYS}


def markdown_table(result: dict) -> str:
    """README text of a results JSON: settings, then Spearman by dimension (% of the full-dimension
    score) and the random-coordinates control."""
    scores, kept = result["stsb_dev_spearman"], result["percent_of_full_dimension_score"]
    dims = [k for k in next(iter(scores.values())) if k != "full"]
    trained = result["training"].get("trained_with") or {}
    settings = []
    for name in scores:
        t = trained.get(name)
        if t:
            extra = f", Matryoshka dims {t['matryoshka_dims']}" if t.get("matryoshka_dims") else ""
            settings.append(f"{name}: {t['max_steps']} steps, batch {t['batch_size']}, lr {t['lr']}, seed {t['seed']}{extra}")
    control = result.get("random_dims_control", {})
    lines = [
        f"SimCSE on the recipe's MNTP adapter ({'; '.join(settings) or 'settings in the JSON'}); STS-B dev, "
        f"{result['eval']['pairs']} pairs, Spearman x 100 of the cosine of the first d dimensions (% of the same "
        "model's full-dimension score)."
        + (f" Control rows: mean of {control['draws']} draws of d random coordinates of the same embeddings." if control else ""),
        "",
        "| SimCSE loss | " + " | ".join(f"{d} dims" for d in dims) + f" | full ({result['hidden_size']}) |",
        "|---" * (len(dims) + 2) + "|",
    ]
    for name, s in scores.items():
        cells = [f"{s[d]:.1f} ({kept[name][d]:.0f} %)" for d in dims]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {s['full']:.1f} |")
    for name, r in control.get("stsb_dev_spearman", {}).items():
        lines.append(f"| {name}, d random coordinates | " + " | ".join(f"{r[d]:.1f}" if d in r else "" for d in dims) + " | |")
    shares = result.get("prefix_norm_share", {}).get("by_model", {})
    for name, r in shares.items():
        lines.append(
            f"| {name}, % of the squared norm in the first d | "
            + " | ".join(f"{r[d]:.1f} %" if d in r else "" for d in dims)
            + " | 100 % |"
        )
    if shares:
        tops = [
            f"{name} #{r['top_coordinates'][0]['index']} ({r['top_coordinates'][0]['share_of_squared_norm_%']:.1f} %)"
            for name, r in shares.items()
        ]
        lines += ["", f"Coordinate with the largest mean square (its mean share of the squared norm): {', '.join(tops)}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/recipe_matryoshka.json"))
    p.add_argument("--run-dir", default=str(ROOT / "runs/recipe_matryoshka"))
    p.add_argument("--mntp-adapter", default=None, help="reuse this MNTP adapter (default: train it as recipe_sts.py does)")
    p.add_argument(
        "--plain-simcse-adapter", default=None, help="reuse this plain SimCSE adapter (trained on --mntp-adapter with the same settings)"
    )
    p.add_argument("--matryoshka-simcse-adapter", default=None, help="reuse this Matryoshka SimCSE adapter (skip its training)")
    p.add_argument("--dims", default=",".join(map(str, DEFAULT_DIMS)), help="prefix sizes below the full dimension (default 64,128,256)")
    p.add_argument("--dev-limit", type=int, default=None, help="evaluate on the first N dev pairs (default: all 1500)")
    p.add_argument("--resume", action="store_true", help="continue interrupted training from its checkpoints")
    p.add_argument("--train-only", action="store_true", help="train the missing adapters, skip the evaluation")
    p.add_argument(
        "--only",
        choices=("plain", "matryoshka"),
        default=None,
        help="train and evaluate one of the two adapters (write its scores to --out)",
    )
    p.add_argument(
        "--reuse-scores", default=None, help="JSON written by --only ({'scores': {name: ...}, 'random_dims': ...}): not re-evaluated"
    )
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
    hidden = LLM2Vec.from_pretrained("default-base", device="cpu").hidden_size
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

    reused = json.loads(Path(args.reuse_scores).read_text()) if args.reuse_scores else {}
    scores, random_dims = reused.get("scores", {}), reused.get("random_dims", {})
    for name, adapter in adapters.items():
        if name in scores or (args.only and name != args.only):
            continue
        encoder = LLM2Vec.from_pretrained("default-base", peft_model_name_or_path=[mntp, adapter], device="cpu")
        emb, pairs, index = encode_dev(encoder, args.dev_limit, run / f"dev_embeddings_{name}.npy")
        scores[name] = {k: round(v, 2) for k, v in dev_scores_by_dim(emb, pairs, index, dims + [None]).items()}
        random_dims[name] = {k: round(v, 2) for k, v in random_dims_scores(emb, pairs, index, dims).items()}
        log(f"{name}: {scores[name]}; random coordinates: {random_dims[name]}")
    norm_share = {
        name: prefix_norm_share(np.load(run / f"dev_embeddings_{name}.npy"), dims)
        for name in adapters
        if (run / f"dev_embeddings_{name}.npy").is_file()
    }
    if args.only:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"scores": scores, "random_dims": random_dims}, indent=2) + "\n")
        return 0
    retained = {name: {str(d): round(100 * s[str(d)] / s["full"], 1) for d in dims} for name, s in scores.items()}
    trained_with = {name: adapter_training(a) for name, a in adapters.items()}  # from each run's train_config.json
    out = {
        "model": f"HuggingFaceTB/{DEFAULT_MODEL_NAME}",
        "hidden_size": hidden,
        "training": {
            "mntp": portable_path(mntp),
            "simcse": {k: v for k, v in recipe["simcse"].items() if k != "output_dir"},
            # what the Matryoshka adapter was trained with (a reused one may differ from --dims)
            "matryoshka_dims": (trained_with.get("matryoshka") or {}).get("matryoshka_dims") or matryoshka_dims,
            "matryoshka_weights": "1 each (sum of the InfoNCE losses of each prefix)",
            "adapters": {name: portable_path(a) for name, a in adapters.items()},
            "trained_with": trained_with,
        },
        "eval": {"split": "dev", "pairs": args.dev_limit or 1500, "pooling": "mean", "metric": "Spearman x 100 of cosine"},
        "stsb_dev_spearman": scores,
        "percent_of_full_dimension_score": retained,
        "random_dims_control": {
            "draws": 5,
            "what": "mean Spearman x 100 of d coordinates drawn at random (5 draws, seed 0) from the same embeddings",
            "stsb_dev_spearman": random_dims,
        },
        "prefix_norm_share": {
            "what": "mean % of each dev embedding's squared norm in its first d coordinates (even spread: 100 d / hidden), "
            "and the 5 coordinates with the largest mean square",
            "by_model": norm_share,
        },
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
