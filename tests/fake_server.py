"""A small OpenAI-compatible completions server on loopback, computed by our own network: the
protocol side of evalsuite.server tested fast and exactly (a real engine, llama.cpp's server, is
tested in test_server_llamacpp.py). Faults are switched on per test: `fail_after` (HTTP 500 from the
n-th completion on), `shift` (every log-prob moved: another model), `no_logprobs`, `wrong_echo`."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class FakeServer:
    def __init__(self, lm, name: str = "tiny"):
        self.lm, self.name = lm, name
        self.completions = 0  # completion requests answered or refused
        self.fail_after: int | None = None
        self.shift = 0.0
        self.no_logprobs = self.wrong_echo = False
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    @torch.inference_mode()
    def _scores(self, ids: list[int]) -> tuple[list[float], list[float]]:
        """log p(ids[j] | ids[:j]) and the top-1 log-prob at j, for j >= 1."""
        x = torch.tensor([ids])
        logits = self.lm.model(x, valid=torch.ones_like(x, dtype=torch.bool)).float()[0, :-1]
        logp = logits - torch.logsumexp(logits, -1, keepdim=True)
        own = logp.gather(-1, x[0, 1:, None])[:, 0]
        return own.tolist(), logp.max(-1).values.tolist()

    def complete(self, body: dict) -> dict:
        tok = self.lm.tokenizer
        prompt = body["prompt"]
        ids = tok.encode(prompt, bos=True)
        if body.get("echo"):
            own, top = self._scores(ids)
            offsets = [len(tok.decode(ids[1:j])) for j in range(1, len(ids))]
            values: list = [None] + [v + self.shift for v in own[1:]]  # OpenAI-style: none for the first token
            tops: list = [None] + [{"x": t + self.shift} for t in top[1:]]
            text = ("Q" if self.wrong_echo else "") + prompt + "."
            logprobs = None if self.no_logprobs else {
                "tokens": [tok.decode([i]) for i in ids[1:]] + ["."], "text_offset": offsets + [len(prompt)],
                "token_logprobs": values + [-1.0], "top_logprobs": tops + [{".": -1.0}]}
            return {"choices": [{"text": text, "logprobs": logprobs, "finish_reason": "length"}],
                    "usage": {"completion_tokens": 1}}
        out = self.lm.greedy(ids, body["max_tokens"], stop_ids=(tok.eos_id,))
        text = tok.decode(out)
        reason = "length" if len(out) == body["max_tokens"] else "stop"
        for s in body.get("stop") or []:
            if s in text:
                text, reason = text[:text.index(s)], "stop"
        return {"choices": [{"text": text, "finish_reason": reason}], "usage": {"completion_tokens": len(out)}}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"data": [{"id": server.name}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.completions += 1
                    n = server.completions
                if server.fail_after is not None and n > server.fail_after:
                    self._send(500, {"error": "engine died"})
                    return
                if body.get("model") != server.name:
                    self._send(404, {"error": f"model {body.get('model')!r} not served"})
                    return
                with server._lock:  # one forward at a time, like a single-slot engine
                    self._send(200, server.complete(body))

        return Handler
