"""Test-only: this project's own model behind an OpenAI-compatible /v1/completions, answering evaluate.py's
requests as vLLM does (a token-id prompt, greedy, max_tokens, stop_token_ids; the generated token ids returned,
ending with the stop id when it stopped on one), so served and local evaluation can be compared on one model.

    with ModelServer("out/tiny") as server:   # 127.0.0.1, a free port
        evaluate.main(EvalConfig(model="out/tiny", base_url=server.base_url, served_model="tiny", ...))

    python -m tests.model_server out/tiny 8000 &  # by hand, from the repository root; then:
    python evaluate.py --model=out/tiny --base_url=http://127.0.0.1:8000/v1 --served_model=tiny
"""

import sys
import threading

import torch

from servers import LocalServer, completion_response
from model import Transformer
from tokenizer import Tokenizer


def refuse(message: str) -> tuple[int, dict, dict]:
    return 400, {"error": {"message": message, "type": "BadRequestError"}}, {}


class ModelServer(LocalServer):
    """Greedy completions of one checkpoint; .generated counts them, .full[prompt ids] holds each prompt's
    continuation without stops."""

    def __init__(self, model_dir, port: int = 0):
        self.model = Transformer.from_pretrained(model_dir).eval()
        self.tok = Tokenizer.from_pretrained(model_dir)
        self.lock = threading.Lock()  # one generation at a time, each a batch of one, as evaluate --batch_size=1
        self.generated = 0
        self.full: dict[tuple[int, ...], list[int]] = {}
        super().__init__(self.complete, port)

    def complete(self, path: str, body: dict):
        if not path.endswith("/v1/completions"):
            return 404, {"error": {"message": f"no route {path}"}}, {}
        prompt, stops = body.get("prompt"), body.get("stop_token_ids")
        if not (isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)):
            return refuse("this server takes only token-id prompts: prompt must be a list of integers")
        if not (isinstance(stops, list) and stops):
            return refuse("stop_token_ids is required (the ids that end a turn)")
        if body.get("temperature") != 0:
            return refuse("this server decodes greedily only: temperature must be 0")
        with self.lock, torch.inference_mode():
            # Greedy decoding of a batch of one is deterministic, so decoding on without stops and cutting after
            # the first stop id gives the tokens a stopping decode gives, plus the stop id that vLLM returns.
            ids = self.model.generate([prompt], body["max_tokens"], stop_ids=(), pad_id=self.tok.pad_id)[0]
            self.generated += 1
            self.full[tuple(prompt)] = ids
        cut = next((k + 1 for k, t in enumerate(ids) if t in stops), None)
        ids = ids[:cut]
        text = self.tok.decode(ids)  # special tokens kept (skip_special_tokens: false)
        return 200, completion_response(text, token_ids=ids, finish_reason="length" if cut is None else "stop"), {}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    server = ModelServer(sys.argv[1], int(sys.argv[2]))
    print(f"serving {sys.argv[1]} at {server.base_url} as any model name; Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.server_close()
