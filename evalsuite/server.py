"""Models served by an inference server, through its OpenAI-compatible completions endpoint.

    python -m evalsuite +tasks=arc_e model.backend=openai server.base_url=http://127.0.0.1:8000/v1 \
        model.path=/ckpt/gemma-2-9b            # the weights the server serves: the parity reference

`ServerBackend` answers the requests itself (evalsuite.requests.RequestBackend), concurrently, with
the result cache keyed by the served model's name and the reference weights (not the address):
  * log-likelihoods from `echo` + `logprobs`: the prompt is context + continuation, the server
    returns every prompt token's log-prob and text offset, and the continuation is the tokens from
    the context's length on. Servers that return prompt log-probs this way: vLLM, SGLang,
    llama-cpp-python's server (started with logits_all, its default); OpenAI's own models and
    llama.cpp's llama-server do not (refused at the parity gate: the reply has no prompt log-probs).
  * generation with the request's stop strings, max_tokens and sampling settings (seed sent;
    engines differ in how they honour it). A stop string ends the text as with our backend; the
    server's "stop" finish reason covers both a stop string and the end-of-sequence token.
  * prompts are text (the server tokenizes, adding BOS as Gemma's tokenizer does); chat-format
    prompts carry our Gemma turn markers as text, which Gemma tokenizers map to their special ids.

Before any scoring, `parity_gate` scores the fixed golden probe set (evalsuite.golden) on the server
and compares every token's log-prob with our network's on the same weights (run here from
model.path, or read from a golden file recorded with `python -m evalsuite.golden record`); above
server.parity_tolerance the run stops (exit 2) with a per-token diff. server.parity=off skips it,
recorded as a deviation of every task.

Fail closed: a request that still errors after its retries, a reply without the prompt's log-probs
or with a non-finite one, a reply that does not echo the prompt it was sent, or tokens that do not
split at the continuation: the run ends naming the task and item (RequestFailed), with every
finished request already in the result cache, so a rerun resumes.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

import requests as http
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

from .requests import (Chat, Generation, GenerationResult, Loglikelihood, LoglikelihoodResult, RequestFailed,
                       split_pair)

# The chat markers as text, as the server's tokenizer reads them (Gemma 4 renamed ids 105 and 106).
MARKERS = {"gemma4": ("<|turn>", "<turn|>")}
SOT, EOT = "<start_of_turn>", "<end_of_turn>"


class ParityError(ValueError):
    """The server's log-probs differ from our network's on the same weights by more than the tolerance."""


def chat_text(chat: Chat, family: str | None = None) -> str:
    """The Gemma chat format as text (BOS left to the server's tokenizer), with the markers and the
    system role of the model family (`MARKERS`; Gemma 1-3's by default)."""
    sot, eot = MARKERS.get(family, (SOT, EOT))
    chat = chat.folded(family == "gemma4")
    turns = [("system", chat.system)] if chat.system else []
    turns += [turn for user, model in chat.examples for turn in (("user", user), ("model", model))]
    turns.append(("user", chat.user))
    return "".join(f"{sot}{role}\n{body}{eot}\n" for role, body in turns) + f"{sot}model\n"


def loglikelihood_prompt(req: Loglikelihood, family: str | None = None) -> tuple[str, int]:
    """(prompt text, where the continuation starts in it), with the runner's split rule."""
    if isinstance(req.context, Chat):
        context, continuation = chat_text(req.context, family), req.continuation.lstrip(" ")
    else:
        context, continuation = split_pair(req.context, req.continuation)
    return context + continuation, len(context)


class Client:
    """POST to one server's OpenAI-compatible API: a pooled session per thread, retries with
    exponential backoff on connection errors and 429/5xx (urllib3's Retry), a read timeout."""

    def __init__(self, base_url: str, api_key: str | None = None, retries: int = 3, timeout_s: float = 300.0,
                 backoff_s: float = 0.5):
        self.base_url, self.timeout = base_url.rstrip("/"), (10.0, timeout_s)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retry = Retry(total=retries, connect=retries, read=retries, status=retries, other=retries,
                           backoff_factor=backoff_s, status_forcelist=(429, 500, 502, 503, 504),
                           allowed_methods=None, raise_on_status=False)  # completions are idempotent: POST retried
        self._local = threading.local()

    def _session(self) -> http.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = http.Session()
            s.mount("http://", HTTPAdapter(max_retries=self.retry))
            s.mount("https://", HTTPAdapter(max_retries=self.retry))
        return s

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        url = f"{self.base_url}{path}"
        try:
            r = self._session().request(method, url, json=body, headers=self.headers, timeout=self.timeout)
        except http.RequestException as e:
            raise ConnectionError(f"{url}: no answer after {self.retry.total} retries ({type(e).__name__}: {e})") from None
        if r.status_code != 200:
            raise ConnectionError(f"{url}: HTTP {r.status_code}: {r.text[:300]}")
        try:
            return r.json()
        except ValueError:
            raise ConnectionError(f"{url}: the reply is not JSON: {r.text[:200]!r}") from None

    def models(self) -> list[str]:
        return [m["id"] for m in self.call("GET", "/models").get("data", [])]


def echo_logprobs(reply: dict, prompt: str) -> tuple[list[int], list[float | None], list[float | None]]:
    """(text offsets, log-probs, top-1 log-probs) of the prompt's tokens in an echo reply; raises
    ValueError where the reply is not the echo of `prompt` with its log-probs."""
    try:
        choice = reply["choices"][0]
        lp = choice["logprobs"]
        offsets, values, tops = lp["text_offset"], lp["token_logprobs"], lp["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("the reply has no prompt log-probs (choices[0].logprobs with text_offset, token_logprobs "
                         "and top_logprobs): the server does not support echo with logprobs") from None
    if not isinstance(choice.get("text"), str) or not choice["text"].startswith(prompt):
        raise ValueError("the reply does not echo the prompt it was sent (a response for another prompt?)")
    n = sum(1 for o in offsets if o < len(prompt))  # the generated token(s) start at or after the prompt's end
    if not 0 < n <= len(values) or len(tops) < n or any(b < a for a, b in zip(offsets, offsets[1:n])):
        raise ValueError(f"the reply's prompt tokens are inconsistent ({len(offsets)} offsets, {len(values)} log-probs)")
    top1 = [max(t.values()) if t else None for t in tops[:n]]
    return offsets[:n], values[:n], top1


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _top1(value: float, top: float) -> bool:
    """Whether a token's log-prob is the position's top-1 (ties within float noise)."""
    return value >= top - 1e-6 * max(1.0, abs(top))


class ServerBackend:
    """An OpenAI-compatible completions server as a RequestBackend (see the module docstring)."""

    caches = True  # evaluate gives it a ResultCache

    def __init__(self, client: Client, model: str, reference: dict[str, Any], concurrency: int = 8,
                 progress: bool = True):
        """reference: what the server's numbers are held to: {'fingerprint_sha256', 'source'}; the
        parity gate adds its outcome."""
        self.client, self.model = client, model
        self.reference, self.concurrency, self.progress = dict(reference), concurrency, progress
        self.family: str | None = None  # the model family, for the chat markers (open_backend sets it)
        self.parity: dict[str, Any] = {"status": "not run"}
        self.deviations: list[str] = []
        self.cache = None
        self.from_cache = self.computed = self.tokens_scored = self.tokens_generated = 0
        self.tokens_forwarded = 0  # not known: the server's work

    @property
    def system_role(self) -> bool:
        return self.family == "gemma4"

    # ---- the protocol ---------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Loglikelihood]) -> list[LoglikelihoodResult]:
        prompts = [loglikelihood_prompt(r, self.family) for r in requests]

        def one(i: int) -> list:
            prompt, split = prompts[i]
            offsets, values, top1 = self._echo(prompt)
            if split not in offsets:
                raise ValueError(f"the server's tokens do not split at the continuation (character {split} of the "
                                 "prompt falls inside a token): its tokenizer differs from the model's")
            first = offsets.index(split)
            if first == 0:
                raise ValueError("the continuation starts at the prompt's first token, which has no log-prob")
            cont, tops = values[first:], top1[first:]
            if not all(_finite(v) for v in cont) or not all(_finite(t) for t in tops):
                raise ValueError(f"empty or non-finite log-prob among the continuation's tokens: {cont}")
            return [float(sum(cont)), all(_top1(v, t) for v, t in zip(cont, tops)), len(cont)]

        keys = [self._key("loglikelihood", p) for p in prompts]
        out = self._answer(keys, one, "loglikelihood", "loglikelihood")
        self.tokens_scored += sum(v[2] for v in out)
        return [LoglikelihoodResult(*v) for v in out]

    def loglikelihood_rolling(self, texts: list[str]) -> list[LoglikelihoodResult]:
        """log p(text) after BOS, in one piece (the server refuses a text longer than its context).
        The first token's log-prob is not returned by most servers: such a reply is refused."""
        def one(i: int) -> list:
            _, values, top1 = self._echo(texts[i])
            if not all(_finite(v) for v in values):
                raise ValueError("the server gives no log-prob for some token of the text (the first, after BOS, "
                                 "is left out by OpenAI-style echo)")
            return [float(sum(values)), all(_top1(v, t) for v, t in zip(values, top1)), len(values)]

        out = self._answer([self._key("rolling", t) for t in texts], one, "rolling", "loglikelihood_rolling")
        return [LoglikelihoodResult(*v) for v in out]

    def generate_until(self, requests: list[Generation]) -> list[GenerationResult]:
        prompts = [chat_text(r.context, self.family) if isinstance(r.context, Chat) else r.context for r in requests]

        def one(i: int) -> list:
            req = requests[i]
            body: dict[str, Any] = {"temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}
            if req.top_k:
                body["top_k"] = req.top_k  # not OpenAI's: vLLM, SGLang and llama.cpp take it
            if req.stop:
                body["stop"] = list(req.stop)
            reply = self._complete(prompts[i], max_tokens=req.max_tokens, **body)
            try:
                choice = reply["choices"][0]
                text, reason = choice["text"], choice.get("finish_reason")
            except (KeyError, IndexError, TypeError):
                raise ValueError(f"the reply has no choices[0].text: {json.dumps(reply)[:200]}") from None
            if not isinstance(text, str):
                raise ValueError(f"choices[0].text is not text: {text!r}")
            cut = min((text.find(s) for s in req.stop if s in text), default=-1)
            if cut >= 0:  # a server that returns the stop string (or text after it): cut as ours does
                text, reason = text[:cut], "stop"
            finish = {"stop": "stop", "length": "length"}.get(reason)
            if finish is None:
                raise ValueError(f"unexpected finish_reason {reason!r}")
            used = (reply.get("usage") or {}).get("completion_tokens")
            return [text, [], finish, used if isinstance(used, int) else None]

        keys = [self._key("generate", p, r.stop, r.max_tokens, r.temperature, r.top_k, r.top_p, r.seed)
                for p, r in zip(prompts, requests)]
        out = self._answer(keys, one, "generate", "generate_until")
        self.tokens_generated += sum(v[3] or 0 for v in out)
        return [GenerationResult(v[0], v[1], v[2]) for v in out]

    def describe(self) -> dict[str, Any]:
        return {"backend": "openai", "source": self.client.base_url, "served_model": self.model,
                "family": "served", "fingerprint_sha256": self.reference.get("fingerprint_sha256"),
                "reference": self.reference.get("source"), "parity": self.parity}

    def version_key(self) -> dict[str, Any]:
        from .cache import code_version
        # Not the address: a server restarted elsewhere on the same weights resumes from the cache. The
        # weights are those the parity gate held the server to; unchecked (parity=off), the name alone.
        return {"backend": "openai", "served_model": self.model,
                "fingerprint_sha256": self.reference.get("fingerprint_sha256") or f"unverified {self.model}",
                "code": code_version()}

    # ---- plumbing -------------------------------------------------------------------------------
    def _complete(self, prompt: str, **body) -> dict:
        return self.client.call("POST", "/completions", {"model": self.model, "prompt": prompt, **body})

    def _echo(self, prompt: str) -> tuple[list[int], list[float | None], list[float | None]]:
        """The prompt's tokens as the server scores them (echo_logprobs of an echo request)."""
        return echo_logprobs(self._complete(prompt, max_tokens=1, echo=True, logprobs=1), prompt)

    def _key(self, kind: str, *request) -> str | None:
        return self.cache.key(kind, request) if self.cache is not None else None

    def _answer(self, keys: list, one, kind: str, what: str) -> list:
        """one(i) for every request not in the result cache, `concurrency` at a time; finished answers
        are committed to the cache as they come (every second), so a failure loses none of them."""
        done: dict[int, Any] = {}
        if self.cache is not None:
            found = self.cache.get_many(list(dict.fromkeys(keys)))
            done = {i: found[k] for i, k in enumerate(keys) if k in found}
            self.from_cache += len(done)
        todo = [i for i in range(len(keys)) if i not in done]
        pending: dict[int, Any] = {}
        bar = tqdm(total=len(keys), initial=len(done), desc=f"{what} (server)", unit="req", disable=not self.progress)
        last = time.monotonic()

        def commit():
            if self.cache is not None and pending:
                self.cache.put_many(kind, {keys[i]: v for i, v in pending.items()})
            done.update(pending)
            self.computed += len(pending)
            pending.clear()

        def guarded(i: int):
            try:
                return one(i)
            except (ValueError, ConnectionError) as e:
                raise RequestFailed(i, str(e)) from None

        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = {pool.submit(guarded, i): i for i in todo}
            remaining = set(futures)
            while remaining:
                finished, remaining = wait(remaining, timeout=1.0, return_when=FIRST_EXCEPTION)
                failed = None
                for f in finished:
                    if f.exception() is not None:
                        failed = failed or f.exception()
                    else:
                        pending[futures[f]] = f.result()
                bar.update(len(finished) - (failed is not None))
                if failed is None and time.monotonic() - last >= 1.0:
                    commit()
                    last = time.monotonic()
                if failed is not None:  # stop: start nothing more, keep what those in flight bring
                    for f in remaining:
                        f.cancel()
                    wait(remaining)
                    pending.update((futures[f], f.result()) for f in remaining
                                   if not f.cancelled() and f.exception() is None)
                    commit()
                    raise failed
            commit()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        return [done[i] for i in range(len(keys))]


def parity_gate(backend: ServerBackend, probes: list[dict], tolerance: float) -> dict[str, Any]:
    """Score the golden probes (evalsuite.golden: {'text', 'ids', 'logprobs'} of our network, ids with
    BOS) on the server and compare token by token. Returns {'max_abs_delta', 'tokens', 'failures':
    [(probe, position, token text, ours, server)]}; raises ParityError where the server's tokens are
    not ours (the comparison would be meaningless) or where it gives no prompt log-probs."""
    worst, compared, failures = 0.0, 0, []
    for p, probe in enumerate(probes):
        text, ours = probe["text"], probe["logprobs"]
        try:
            offsets, values, _ = backend._echo(text)
        except ConnectionError as e:
            raise ParityError(f"parity gate: the server did not answer probe {p}: {e}") from None
        except ValueError as e:
            raise ParityError(f"parity gate, probe {p}: {e}") from None
        if len(values) != len(ours):  # ours: one log-prob per token after BOS
            raise ParityError(f"parity gate, probe {p}: the server's tokenizer splits it into {len(values)} tokens, "
                              f"ours into {len(ours)} (another tokenizer or model behind the server?)")
        for j, (mine, theirs) in enumerate(zip(ours, values)):
            if theirs is None and j == 0:
                continue  # OpenAI-style echo gives no log-prob for the first prompt token
            if not _finite(theirs):
                raise ParityError(f"parity gate, probe {p}, token {j + 1}: the server's log-prob is {theirs!r}")
            delta = abs(theirs - mine)
            worst, compared = max(worst, delta), compared + 1
            if delta > tolerance:
                piece = text[offsets[j]:offsets[j + 1] if j + 1 < len(offsets) else len(text)]
                failures.append((p, j + 1, piece, mine, theirs))
    return {"max_abs_delta": worst, "tokens": compared, "failures": failures}


def diff_table(result: dict, limit: int = 20) -> str:
    rows = sorted(result["failures"], key=lambda f: -abs(f[3] - f[4]))[:limit]
    lines = ["| probe | position | token | ours | server | delta |", "|---|---|---|---|---|---|"]
    lines += [f"| {p} | {pos} | {tok!r} | {a:.5f} | {b:.5f} | {b - a:+.3e} |" for p, pos, tok, a, b in rows]
    if len(result["failures"]) > limit:
        lines.append(f"({len(result['failures']) - limit} more tokens differ)")
    return "\n".join(lines)


def open_backend(model, server, device: str = "cpu", dtype: str = "float32", progress: bool = True) -> ServerBackend:
    """model.backend=openai: the client, the served model's name, the reference and the parity gate
    (model: evalsuite.settings.ModelSettings, server: ServerSettings)."""
    client = Client(server.base_url, os.environ.get(server.api_key_env) if server.api_key_env else None,
                    server.retries, server.timeout_s)
    name = server.model
    if name is None:
        try:
            served = client.models()
        except ConnectionError as e:
            raise ValueError(f"server.base_url={server.base_url!r}: cannot list the served models ({e})") from None
        if len(served) != 1:
            raise ValueError(f"server.model is not set and {server.base_url} serves {len(served)} models "
                             f"({', '.join(served) or 'none'}): name one with server.model=")
        name = served[0]
    from .model.config import preset
    family = preset(model.preset).family if model.preset else None
    if server.parity == "off":
        backend = ServerBackend(client, name, {"fingerprint_sha256": None, "source": None}, server.concurrency, progress)
        backend.family = family
        backend.parity = {"status": "off"}
        backend.deviations.append("server.parity=off: the server's numbers were NOT checked against our network "
                                  "(no parity gate)")
        return backend
    reference, probes, reference_family = reference_probes(model, server.parity_golden, device, dtype)
    backend = ServerBackend(client, name, reference, server.concurrency, progress)
    backend.family = reference_family or family
    result = parity_gate(backend, probes, server.parity_tolerance)
    backend.parity = {"status": "passed" if not result["failures"] else "failed", "reference": reference["source"],
                      "tolerance": server.parity_tolerance, "max_abs_delta": result["max_abs_delta"],
                      "tokens_compared": result["tokens"], "probes": len(probes)}
    if result["failures"]:
        raise ParityError(
            f"parity gate FAILED: {len(result['failures'])} of {result['tokens']} probe token log-probs from "
            f"{server.base_url} (model {name!r}) differ from {reference['source']} by more than "
            f"server.parity_tolerance={server.parity_tolerance} (max |delta| {result['max_abs_delta']:.3e}). "
            "The server computes another model, or computes this one wrongly; nothing was scored.\n"
            + diff_table(result))
    return backend


def reference_probes(model, golden_file: str | None, device: str, dtype: str) -> tuple[dict, list[dict], str | None]:
    """(reference {'fingerprint_sha256', 'source'}, the golden probes with our log-probs, the model
    family where our network computed them): read from a golden file when one is given, else
    computed by our network on model.path."""
    from . import golden
    from .model import load_model
    if golden_file:
        g = golden.load(Path(golden_file))
        return ({"fingerprint_sha256": g["fingerprint_sha256"],
                 "source": f"golden file {golden_file} ({g['dtype']}, {g['device']})"}, g["probes"], None)
    lm = load_model(model.path, device=device, dtype=dtype, preset=model.preset)
    probes = golden.compute(lm)
    return ({"fingerprint_sha256": lm.fingerprint(), "source": f"our network on {model.path} ({dtype}, {device})"},
            probes, lm.config.family)
