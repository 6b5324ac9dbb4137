"""Encode sentences with the default model and rank them by cosine similarity to a query.

python examples/encode.py
"""

from llm2vec_fast import LLM2Vec

encoder = LLM2Vec.from_pretrained()  # the embedded default model, on the CPU or the GPU
documents = [
    "A man is playing a guitar.",
    "A woman is slicing an onion in the kitchen.",
    "Two dogs are running through a snowy field.",
]
# an [instruction, text] pair: the instruction is attended to but left out of the pooling
query = ["Retrieve semantically similar text:", "Someone plays an instrument."]

doc_embeddings = encoder.encode(documents, normalize_embeddings=True)
query_embedding = encoder.encode([query], normalize_embeddings=True)[0]
scores = doc_embeddings @ query_embedding  # unit vectors: the dot product is the cosine
for score, text in sorted(zip(scores.tolist(), documents), reverse=True):
    print(f"{score:.3f}  {text}")

# smaller vectors: the first 256 dimensions (Matryoshka truncation), as sign bits packed 8 per byte
packed = encoder.encode(documents, truncate_dim=256, precision="ubinary")
print("binary codes:", tuple(packed.shape), packed.dtype)  # 3 texts x 32 bytes
