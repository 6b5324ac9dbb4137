"""Start the embedding server on the default model and query it with the openai client.

    pip install "llm2vec-fast[serve]"
    python examples/serve_openai.py

The script starts ``llm2vec-fast serve`` on a free local port, waits for it, sends two requests
and stops it. Against a server you run yourself, only the client part is needed.
"""

import socket
import subprocess
import sys
import time

import httpx
from openai import OpenAI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


port = free_port()
server = subprocess.Popen([sys.executable, "-m", "llm2vec_fast.cli", "serve", "--host", "127.0.0.1", "--port", str(port)])
try:
    deadline = time.monotonic() + 300
    while True:  # the model loads before the port opens
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            sys.exit("the server did not start")
        time.sleep(0.5)

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")  # set --api-key on the server to require one
    model = client.models.list().data[0].id
    resp = client.embeddings.create(model=model, input=["A man is playing a guitar.", "Someone plays an instrument."])
    a, b = (d.embedding for d in resp.data)  # unit length, in input order
    print(f"{model}: {len(a)} dimensions, cosine {sum(x * y for x, y in zip(a, b)):.3f}, {resp.usage.prompt_tokens} tokens")

    # extensions: an instruction (attended to, not pooled) and fewer dimensions
    resp = client.embeddings.create(
        model=model, input=["who plays the guitar?"], dimensions=256, extra_body={"instruction": "Retrieve relevant passages:"}
    )
    print("query embedding:", len(resp.data[0].embedding), "dimensions")
finally:
    server.terminate()  # SIGTERM: in-flight requests finish, then the server exits
    server.wait(timeout=60)
