"""Export the default model to ONNX int8, then compare it with the torch encoder (fidelity and speed).

pip install "llm2vec-fast[onnx]"
python examples/export_int8.py            # full calibration and validation (about 1.5 min on 2 cores)
python examples/export_int8.py --quick    # fewer STS-B validation pairs (CI)
"""

import argparse
import tempfile
import time
from pathlib import Path

from llm2vec_fast.export import OnnxEncoder, ValidationConfig, export_onnx

from llm2vec_fast import LLM2Vec

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="a small STS-B validation set (CI)")
args = parser.parse_args()

encoder = LLM2Vec.from_pretrained(dtype="float32", device="cpu")  # export from fp32
texts = [
    "A man is playing a guitar.",
    "Two dogs are running through a snowy field.",
    ["Retrieve semantically similar text:", "Someone plays an instrument."],
] * 8

with tempfile.TemporaryDirectory() as work:
    folder = Path(work) / "encoder-int8"
    # the export validates itself against torch and raises below the int8 thresholds (export_report.json)
    export_onnx(
        encoder,
        folder,
        precision="int8",
        calibration_sentences=96,  # fewer made the layer selection overfit its inputs and miss validation
        validate=ValidationConfig(stsb_pairs=40 if args.quick else 200),
    )
    onnx_encoder = OnnxEncoder.from_pretrained(folder)

    start = time.perf_counter()
    reference = encoder.encode(texts, normalize_embeddings=True)
    torch_s = time.perf_counter() - start
    start = time.perf_counter()
    quantized = onnx_encoder.encode(texts, normalize_embeddings=True)
    onnx_s = time.perf_counter() - start

    cosines = (reference * quantized).sum(axis=1)
    print(f"min cosine int8 vs torch fp32: {float(cosines.min()):.4f}")
    print(f"torch fp32 {torch_s:.2f} s, ONNX int8 {onnx_s:.2f} s for {len(texts)} texts (one run, not a benchmark)")
