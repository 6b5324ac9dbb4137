"""Build the shipped default encoder: the recipe of ``benchmarks/recipe_sts.py`` (MNTP, then
unsupervised SimCSE on the unlabeled STS-B train sentences) with a learning curve (STS-B dev
Spearman every ``--eval-every`` SimCSE steps) and the run's settings pinned for reproducibility.

    python benchmarks/recipe_default.py --ship-step 300   # the shipped build; writes benchmarks/results/recipe_default.json

``--ship-step K`` copies the SimCSE adapter of step K (a checkpoint of the same run, or the final
adapter) and the MNTP adapter, as fp16 safetensors, into ``llm2vec_fast/default_adapters/`` (the
encoder that ``LLM2Vec.from_pretrained()`` loads). The training runs in chunks of ``--eval-every``
steps resumed from checkpoints, which on CPU gives bit-for-bit the adapters of one uninterrupted run,
so an interrupted build continues with ``--resume`` (which also reuses a finished MNTP stage).
Steps before the last are scored on the first ``--curve-dev-limit`` dev pairs (cheaper), the last on
all 1500 (``dev_1500_pairs``).

What makes two builds equal: the seed (data order, masking, LoRA init, dropout), the torch thread
count (``--threads``, 2 by default: the shipped build's) and the torch / transformers /
peft versions (kernels change between releases: two runs with torch 2.13 and 2.14 differed by 2.7
dev points); all are recorded in the JSON and in ``default_adapters/provenance.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from recipe_sts import add_recipe_args, embed_all_modes, stage_configs  # noqa: E402

SHIP_DIR = ROOT / "llm2vec_fast" / "default_adapters"


def software_versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def pin_determinism(threads: int) -> None:
    """Fix what varies between runs of one seed on CPU: the thread count and nondeterministic kernels."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling torch.empty costs time, changes nothing here


def checkpoint_adapter(simcse_dir: Path, step: int, max_steps: int) -> Path:
    """The SimCSE adapter after ``step`` steps of the run (final adapter at ``max_steps``)."""
    from llm2vec_fast.train.trainer import ADAPTER_DIR, CHECKPOINT_PREFIX

    if step == max_steps:
        return simcse_dir / ADAPTER_DIR
    return simcse_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}" / ADAPTER_DIR


def dev_of(chain: list[str], limits: list[int | None]) -> dict[int, float]:
    """STS-B dev Spearman x100 of the encoder with the adapter ``chain`` (at the inference lengths)
    on the first ``limit`` pairs for each of ``limits`` (``None``: all), from one embedding pass."""
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.stsb import load_stsb, pair_cosines, spearman

    enc = LLM2Vec.from_pretrained(
        "default-base", peft_model_name_or_path=chain, merge_peft=True, max_length=512, doc_max_length=400, device="cpu"
    )
    everything = load_stsb("dev")
    sizes = [limit or len(everything) for limit in limits]
    pairs = everything[: max(sizes)]
    unique = list(dict.fromkeys(s for a, b, _ in pairs for s in (a, b)))
    emb = embed_all_modes(enc, unique, ["mean"])["mean"]
    index = {s: i for i, s in enumerate(unique)}

    def score(n: int) -> float:
        part = pairs[:n]
        return 100 * spearman(pair_cosines(lambda xs: emb[[index[x] for x in xs]], part), [g for _, _, g in part])

    return {n: score(n) for n in sizes}


def train_simcse_with_curve(config: dict, eval_every: int, evaluate, resume: bool) -> Path:
    """Train SimCSE in chunks of ``eval_every`` steps (resumed from checkpoints), calling
    ``evaluate(step, adapter)`` after each chunk; returns the final adapter."""
    from llm2vec_fast.train import make_config, train
    from llm2vec_fast.train.trainer import checkpoints

    out, total = Path(config["output_dir"]), config["max_steps"]
    final = checkpoint_adapter(out, total, total)
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
    for step in range(eval_every, total + eval_every, eval_every):
        step = min(step, total)
        adapter = checkpoint_adapter(out, step, total)
        if not (adapter / "adapter_config.json").is_file():
            done = [int(p.name.split("-")[-1]) for p in checkpoints(out)]
            start = max([s for s in done if s < step], default=0)
            try:
                train("simcse", make_config("simcse", config), resume=True, stop_after=None if step == total else step - start)
            except InterruptedError:
                pass
        evaluate(step, adapter)
    return final


def finished_adapter(stage: dict) -> Path | None:
    """The final adapter of a stage that already ran to the end with these settings (else ``None``)."""
    out = Path(stage["output_dir"])
    try:
        done = json.loads((out / "train_config.json").read_text())
    except (OSError, ValueError):
        return None
    adapter = out / "adapter"
    same = all(done.get(k) == v for k, v in stage.items() if k != "progress")
    return adapter if same and (adapter / "adapter_model.safetensors").is_file() else None


def ship(mntp: Path, simcse: Path, target: Path, provenance: dict) -> None:
    """Copy the two adapters as fp16 safetensors into ``target/{mntp,simcse}`` with inference-length
    ``llm2vec_config.json`` and their ``train_config.json``."""
    from safetensors.torch import load_file, save_file

    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, src in (("mntp", mntp), ("simcse", simcse)):
        dst = tmp / name
        dst.mkdir(parents=True)
        weights = load_file(str(src / "adapter_model.safetensors"))
        save_file({k: v.to(torch.float16).contiguous() for k, v in weights.items()}, str(dst / "adapter_model.safetensors"))
        adapter_cfg = json.loads((src / "adapter_config.json").read_text())
        adapter_cfg["base_model_name_or_path"] = "default-base"  # no machine path in the package
        (dst / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2) + "\n")
        train_cfg = src.parent / "train_config.json"
        if not train_cfg.is_file():  # a checkpoint: <output_dir>/checkpoints/checkpoint-K/adapter
            train_cfg = src.parents[2] / "train_config.json"
        stage_cfg = json.loads(train_cfg.read_text())
        stage_cfg.pop("output_dir", None)
        stage_cfg.pop("log_file", None)
        stage_cfg["peft"] = ["mntp"] if name == "simcse" else []
        (dst / "train_config.json").write_text(json.dumps(stage_cfg, indent=2) + "\n")
    (tmp / "simcse" / "llm2vec_config.json").write_text(
        json.dumps({"pooling_mode": "mean", "max_length": 512, "doc_max_length": 400, "skip_instruction": True}, indent=4) + "\n"
    )
    (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/recipe_default.json"))
    p.add_argument("--run-dir", default=str(ROOT / "runs/recipe_default"))
    add_recipe_args(p)
    p.set_defaults(simcse_steps=400)  # the shipped build: a 400-step schedule, shipped at its best dev step (300)
    p.add_argument("--eval-every", type=int, default=100, help="SimCSE steps between two dev evaluations")
    p.add_argument("--threads", type=int, default=2, help="torch threads (part of what makes two builds equal; the shipped build used 2)")
    p.add_argument("--dev-limit", type=int, default=None, help="evaluate on the first N dev pairs (default: all 1500)")
    p.add_argument("--curve-dev-limit", type=int, default=None, help="score the steps before the last on the first N dev pairs (cheaper)")
    p.add_argument("--eval-mntp", action="store_true", help="also score the encoder after MNTP alone")
    p.add_argument("--resume", action="store_true", help="continue an interrupted build from its checkpoints")
    p.add_argument("--ship-step", type=int, default=None, help="copy the adapters of this SimCSE step into the package")
    p.add_argument("--ship-to", default=str(SHIP_DIR))
    args = p.parse_args(argv)
    if args.ship_step is not None and (args.ship_step % args.eval_every and args.ship_step != args.simcse_steps):
        p.error("--ship-step must be a multiple of --eval-every or --simcse-steps")
    pin_determinism(args.threads)
    torch.manual_seed(args.seed)

    from llm2vec_fast.default_model import DEFAULT_MODEL_NAME
    from llm2vec_fast.train import make_config, train

    run = Path(args.run_dir)
    stages = stage_configs(args, run)
    stages["simcse"].update(save_steps=args.eval_every, save_total_limit=0, progress=False)
    stages["mntp"]["progress"] = False
    for stage in stages.values():
        stage["model"] = "default-base"  # the raw base model: the adapters are trained from it
    config = {"training_text": "unique sentences of STS-B train (labels unused)", **stages}
    config["eval"] = {"split": "dev", "pairs": args.dev_limit or 1500, "pooling": "mean", "max_length": 512, "doc_max_length": 400}
    results: dict = {"curve": []}
    timings: dict[str, float] = {}
    start = time.perf_counter()

    def write(complete: bool) -> dict:
        out = {
            "model": f"HuggingFaceTB/{DEFAULT_MODEL_NAME}",
            "command": "python benchmarks/recipe_default.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.date.today().isoformat(),
            "config": config,
            "versions": software_versions(),
            "torch_threads": torch.get_num_threads(),
            "load_average_start_end": [load_at_start, os.getloadavg()],
            "minutes": round((time.perf_counter() - start) / 60, 2),
            "timings_min": {k: round(v, 2) for k, v in timings.items()},
            "complete": complete,
            "stsb_dev_spearman": results,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(out, indent=2).replace(f"{ROOT}/", "")  # repository-relative paths only
        Path(args.out).write_text(text + "\n")
        return out

    def log(msg: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:6.1f} min] {msg}", flush=True)
        write(complete=False)

    load_at_start = os.getloadavg()
    t = time.perf_counter()
    mntp = finished_adapter(stages["mntp"]) if args.resume else None
    if mntp is None:
        mntp = train("mntp", make_config("mntp", stages["mntp"]), resume=args.resume)
        timings["mntp_train"] = (time.perf_counter() - t) / 60
    if args.eval_mntp:
        results["mntp"] = round(dev_of([str(mntp)], [args.dev_limit])[args.dev_limit or 1500], 2)
        log(f"mntp: dev {results['mntp']:.2f}")

    stages["simcse"]["peft"] = [str(mntp)]
    train_time = [0.0]

    def evaluate(step: int, adapter: Path) -> None:
        train_time[0] = time.perf_counter() - t_simcse - sum(eval_times)
        tic = time.perf_counter()
        curve_limit = args.curve_dev_limit or args.dev_limit
        limits = [curve_limit, args.dev_limit] if step == args.simcse_steps else [curve_limit]
        scores = dev_of([str(mntp), str(adapter)], limits)
        eval_times.append(time.perf_counter() - tic)
        results["curve"].append({"simcse_step": step, **{f"dev_{n}_pairs": round(v, 2) for n, v in scores.items()}})
        score = scores[args.dev_limit or 1500] if step == args.simcse_steps else scores[curve_limit or 1500]
        timings["simcse_train"] = train_time[0] / 60
        timings["evals"] = sum(eval_times) / 60
        log(f"simcse step {step}: dev {score:.2f}")

    eval_times: list[float] = []
    t_simcse = time.perf_counter()
    train_simcse_with_curve(stages["simcse"], args.eval_every, evaluate, args.resume)
    key = f"dev_{args.curve_dev_limit or args.dev_limit or 1500}_pairs"
    # a NaN score (a collapsed model: constant cosines) never wins
    results["best_by_dev"] = max(results["curve"], key=lambda r: (not math.isnan(r[key]), r[key]))
    out = write(complete=True)
    if args.ship_step is not None:
        shipped = next((r for r in results["curve"] if r["simcse_step"] == args.ship_step), None)
        provenance = {
            "command": out["command"].replace(f"{ROOT}/", ""),
            "simcse_step": args.ship_step,
            "stsb_dev_spearman": shipped,
            "versions": out["versions"],
            "torch_threads": out["torch_threads"],
        }
        adapter = checkpoint_adapter(Path(stages["simcse"]["output_dir"]), args.ship_step, args.simcse_steps)
        ship(mntp, adapter, Path(args.ship_to), provenance)
        print(f"shipped SimCSE step {args.ship_step} ({shipped}) to {args.ship_to}")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
