"""Train a tiny unsupervised SimCSE adapter on the default model, then encode with it.

    python examples/train_simcse.py            # 20 steps on the sentences below
    python examples/train_simcse.py --quick    # 2 steps (CI)

SimCSE embeds each sentence twice with dropout and pulls the two views together. A real run trains
MNTP first and uses thousands of sentences: see the training page of the docs.
"""

import argparse
import tempfile
from pathlib import Path

from llm2vec_fast import LLM2Vec
from llm2vec_fast.train import make_config, train

SENTENCES = [
    "A man is playing a guitar.",
    "A woman is slicing an onion.",
    "Two dogs run through the snow.",
    "The stock market fell on Monday.",
    "A cat sleeps on the windowsill.",
    "Heavy rain flooded the streets overnight.",
    "Kids play football in the park.",
    "The committee will publish its report next week.",
]

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="2 training steps (CI)")
args = parser.parse_args()

with tempfile.TemporaryDirectory() as work:
    data = Path(work) / "sentences.txt"
    data.write_text("\n".join(SENTENCES) + "\n")
    config = make_config(
        "simcse",
        {
            "data": str(data),  # one sentence per line
            "output_dir": str(Path(work) / "simcse"),
            "max_steps": 2 if args.quick else 20,
            "batch_size": 4,
            "max_length": 32,
            "lr": 5e-4,
            "lora_layers": 2,  # LoRA on the last 2 layers: a quick run needs no backward below them
            "progress": False,
        },
    )
    adapter = train("simcse", config)  # <output_dir>/adapter, with llm2vec_config.json
    print("adapter:", adapter.relative_to(work))

    encoder = LLM2Vec.from_pretrained(peft_model_name_or_path=str(adapter))
    emb = encoder.encode(SENTENCES[:2], normalize_embeddings=True)
    print("cosine of the first two sentences:", round(float(emb[0] @ emb[1]), 3))
