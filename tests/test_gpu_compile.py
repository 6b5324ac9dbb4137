"""Every Triton kernel config compiles for sm_80 and sm_90 on this CPU, fits the card's shared
memory and spills no registers (:mod:`llm2vec_fast.kernels.compile_check`).

The compile runs in a subprocess without ``TRITON_INTERPRET`` (the suite sets it for the kernel
tests), in a process pool, with the specialisation of a real launch (aligned pointers and strides);
results are cached in the Triton cache dir, so a re-run with unchanged kernels takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from llm2vec_fast.kernels import _dispatch

pytestmark = pytest.mark.skipif(not _dispatch.triton_available(), reason="needs triton")


def test_cases_are_compiled_as_real_launches_specialise_them():
    """Pointers and strides carry Triton's divisibility-by-16 hint (torch's allocations and every
    supported head dim give it), except the token-count strides the kernels do not specialise on."""
    from llm2vec_fast.kernels import compile_check, flash_attn_triton

    case = next(c for c in compile_check._attention_cases(flash_attn_triton) if c["kernel"] == "_attn_fwd_kernel")
    fn = flash_attn_triton._attn_fwd_kernel.fn
    signature, constexprs, attrs = compile_check._signature(fn, case)
    hinted = {fn.arg_names[i] for (i,) in attrs}
    assert {"Q", "K", "V", "O", "LSE", "CU", "stride_qt", "stride_qh", "stride_ot"} <= hinted
    assert not hinted & {"stride_lh", "n_tokens", "mask_stride", "seq_bucket", "seed", "offset", "qk_scale"}
    assert all(v == [["tt.divisibility", 16]] for v in attrs.values())
    assert {fn.arg_names[i] for (i,) in constexprs} == set(case["constexprs"])
    assert set(flash_attn_triton._NOT_SPECIALIZED) & hinted == set()


def test_covering_subset_covers_every_config_pair():
    """The CI subset keeps, per kernel, every (config, arch / dtype / variant / head dim) pair."""
    from llm2vec_fast.kernels import compile_check

    cases = [
        dict(kernel="k", config=c, arch=a, dtype=t, D=d, variant=v)
        for c in "abc"
        for a in (80, 90)
        for t in ("fp16", "bf16")
        for d in (64, 128)
        for v in ("x", "y")
    ]
    kept = compile_check.covering_cases(cases)
    assert len(kept) < len(cases)
    for factor in ("arch", "dtype", "D", "variant"):
        want = {(c["config"], c[factor]) for c in cases}
        assert {(c["config"], c[factor]) for c in kept} == want, factor


def test_every_kernel_config_compiles_for_sm80_and_sm90(tmp_path):
    """Every autotune config, sm_80 and sm_90, fp16 and bf16, dropout+softcap off and on, each head
    dim / pooling mode: compiles, fits shared memory, spills nothing (the covering subset, ~90
    compiles in a process pool; cached in the Triton cache dir, so a warm re-run takes seconds)."""
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "llm2vec_fast.kernels.compile_check", "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(proc.stdout[-3000:])
    results = json.loads(out.read_text())
    failed = [
        f"sm_{r['arch']} {r['kernel']} {r['config']} {r['dtype']} D={r['D']} {r['variant']}: {r.get('error')}"
        for r in results
        if not r["ok"]
    ]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in results:
        assert isinstance(r["n_spills"], int) and r["n_spills"] == 0
        assert r["shared"] <= {80: 163 * 1024, 90: 227 * 1024}[r["arch"]]
    # every autotune config of every kernel, on both architectures, with dropout/softcap on and off
    from llm2vec_fast.kernels import compile_check

    env_cases = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-c",
                "import json; from llm2vec_fast.kernels import compile_check as c; "
                "print(json.dumps([{k: x[k] for k in ('kernel', 'config', 'arch', 'variant', 'dtype')} for x in c.all_cases()]))",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    for key in (("kernel", "config", "arch"), ("kernel", "config", "variant"), ("kernel", "config", "dtype")):
        assert {tuple(c[k] for k in key) for c in env_cases} == {tuple(r[k] for k in key) for r in results}, key
    assert {r["kernel"] for r in results} >= {
        "_attn_fwd_kernel",
        "_attn_bwd_dkdv_kernel",
        "_attn_bwd_dq_kernel",
        "_bwd_preprocess_kernel",
        "_dropout_mask_kernel",
        "_pool_chunk_kernel",
        "_pool_combine_kernel",
        "_pool_select_kernel",
        "_pool_bwd_kernel",
    }
    # the chunked pooling forward compiles with and without its combine pass, for both modes it runs
    chunk = {(r["config"], r["D"]) for r in results if r["kernel"] == "_pool_chunk_kernel"}
    assert {d for _, d in chunk} == {f"{m}/{p}" for m in ("mean", "weighted_mean") for p in ("single", "two-pass")}
    assert len(chunk) == 4 * len({c for c, _ in chunk})  # every config on every path
    assert compile_check.ATTN_VARIANTS == ((False, False), (True, True))
