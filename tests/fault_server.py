"""A small fault-injecting OpenAI-compatible HTTP server for tests (stdlib only, 127.0.0.1).

    from fault_server import FaultServer

    with FaultServer(["429", "ok"]) as srv:         # 1st POST: 429, then every later POST: "ok"
        client = common.ChatClient(srv.url, "m", deadline=5)
        client.complete("x", n=2)                    # survives the 429
        srv.requests                                 # [{"route": "completions", "body": {...}, "fault": "429"}, ...]

    FaultServer(faults, then="ok", reply=None, retry_after=1, trickle_bps=5, routes=None)
      faults      one fault per POST, in order (GET /v1/models always answers); when they run out,
                  every further POST gets `then` (e.g. then="hang": a server that hangs after the
                  preflight's first request succeeded)
      reply       reply(route, body) -> [text] * n for "ok" answers (default: "033;" n times), or a dict
                  {"texts": [...], "finish_reasons": [...], "usage": {...}} (a provider's own accounting);
                  a reply that raises ValueError is answered 400 with its message (a rejected request)
      routes      the routes served (e.g. ("chat/completions",): a chat-only API); a POST elsewhere gets
                  404 without taking a fault. None (default): every route
      retry_after the Retry-After header of "429" answers (seconds, as a string on the wire)
      trickle_bps bytes per second of "trickle" answers

Faults (names are what `faults` / `then` take):
  ok              200, a valid /v1/completions or /v1/chat/completions answer with n choices and usage
  hang            accepts the request, never answers (released when the server closes)
  trickle         200 and a valid body, sent `trickle_bps` bytes per second
  429             429 Too Many Requests with Retry-After: `retry_after`
  500, 503        a server error with a short JSON body
  401, 404        the key / route-or-model errors (not retried by a correct client)
  bad_json        200 with a body that is not JSON
  truncated       200 announcing a longer Content-Length than it sends, then closes
  garbage_status  a status line that is not HTTP ("HELLO garbage"), then closes
  fewer_choices   200 with one choice whatever n was asked
  close           closes the connection without answering

`srv.url` is the base URL ("http://127.0.0.1:PORT/v1"); `srv.requests` records every POST (with the
"texts" and "usage" of the "ok" answers);
`srv.close()` (or leaving the `with`) stops the server and releases hung handlers.

ToyProvider(llm, style, restate=False) is a `reply` that plays a hosted chat API around a local text
model (`common.LLM`, e.g. the toy teacher), for omniopd's chat-only teacher modes:

    prov = ToyProvider(C.LLM.from_hf(C.toy_checkpoint("teacher")), "instruct", restate=True)
    with FaultServer(reply=prov, routes=prov.routes) as srv: ...

      style "completions"  serves /v1/completions (raw continuation of the prompt) and chat as "continue"
            "continue"     chat only; continues a trailing assistant message when the request sets
                           continue_final_message (vLLM's option), else opens a new reply to the user
            "prefill"      chat only; always continues a trailing assistant message (a native prefill, as
                           Anthropic's API does)
            "instruct"     chat only; never continues an assistant message (a new reply to the last user
                           message), but follows omniopd's instruction fallback as an instruction-following
                           model would: a user message "<task>\n\n<one line ending in ':'>\n<partial>" gets
                           the continuation of task + partial; restate=True writes the partial again first
                           (as weak instruction followers do), inside max_tokens, billed as completion tokens
    strict=True answers 400 to fields it does not know (continue_final_message, ...), as OpenAI does;
    knows_probe=False leaves the start-up probe to the local model too (a model too weak for it).
The text a toy model continues is the raw concatenation (user content + assistant content: the toy has no
chat template, so it equals what /v1/completions would get). The provider knows the alphabet: a task that
asks for "the capital letters A to Z" is answered as a capable model would (the clients' start-up probe),
everything else is the local model's sampling. usage: prompt_tokens = the model tokenizer's count of the
request's text (the prompt, or all message contents), once per request (as hosted APIs bill n samples);
completion_tokens = the tokens the model generated plus the restated ones.

Command line: `python tests/fault_server.py hang 429 ...` (a manual fault probe) or
`python tests/fault_server.py --toy_provider completions|continue|prefill|instruct [--restate] [--port P]`
(the toy teacher as a provider; prints its URL, serves until killed).
"""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Sequence

FAULTS = ("ok", "hang", "trickle", "429", "500", "503", "401", "404", "bad_json", "truncated", "garbage_status",
          "fewer_choices", "close")


class FaultServer:
    def __init__(self, faults: Sequence[str] = (), then: str = "ok", reply: Callable[[str, dict], list[str]] | None = None,
                 retry_after: float | str = 1, trickle_bps: float = 5.0, host: str = "127.0.0.1",
                 routes: Sequence[str] | None = None, port: int = 0):
        bad = [f for f in [*faults, then] if f not in FAULTS]
        if bad:
            raise ValueError(f"unknown faults {bad}; known: {', '.join(FAULTS)}")
        self.faults, self.then = list(faults), then
        self.reply = reply or (lambda route, body: ["033;"] * int(body.get("n", 1) or 1))
        self.retry_after, self.trickle_bps = str(retry_after), float(trickle_bps)
        self.routes = None if routes is None else tuple(r.strip("/") for r in routes)
        self.requests: list[dict] = []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._server = ThreadingHTTPServer((host, port), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def next_fault(self, route: str, body: dict) -> str:
        return self._next(route, body)[0]

    def _next(self, route: str, body: dict) -> tuple[str, dict]:
        with self._lock:
            fault = self.faults.pop(0) if self.faults else self.then
            rec = {"route": route, "body": body, "fault": fault}
            self.requests.append(rec)
        return fault, rec

    def answer(self, route: str, body: dict, n: int | None = None, rec: dict | None = None) -> bytes:
        """A valid OpenAI-style JSON answer for the route (n choices, default the request's n); its texts
        and usage are added to the request's record `rec`."""
        out = self.reply(route, body)
        if isinstance(out, dict):
            texts, reasons, usage = out["texts"], out.get("finish_reasons") or ["stop"] * len(out["texts"]), out["usage"]
        else:
            texts, reasons = out, ["stop"] * len(out)
            usage = {"prompt_tokens": 1, "completion_tokens": sum(len(t) for t in texts)}
        if n is not None:
            texts = texts[:n]
        if rec is not None:
            rec.update(texts=list(texts), usage=dict(usage))
        if route.endswith("chat/completions"):
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        return json.dumps({"object": "text_completion", "model": body.get("model"), "choices": choices,
                           "usage": usage}).encode()

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FaultServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _handler(srv: FaultServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):  # quiet
            pass

        def _send(self, code: int, body: bytes, headers: dict | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send(200, json.dumps({"object": "list", "data": [{"id": "fault-model", "object": "model"}]}).encode())

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                body = {}
            route = self.path.split("/v1/", 1)[-1].strip("/")
            self.close_connection = True
            if srv.routes is not None and route not in srv.routes:
                with srv._lock:
                    srv.requests.append({"route": route, "body": body, "fault": "no_route"})
                return self._send(404, json.dumps({"error": {"message": f"no route /v1/{route}",
                                                             "type": "invalid_request_error"}}).encode())
            fault, rec = srv._next(route, body)
            if fault == "ok":
                try:
                    data = srv.answer(route, body, rec=rec)
                except ValueError as e:  # the provider rejects the request
                    return self._send(400, json.dumps({"error": {"message": str(e),
                                                                 "type": "invalid_request_error"}}).encode())
                self._send(200, data)
            elif fault == "hang":
                srv._stop.wait()
            elif fault == "trickle":
                data = srv.answer(route, body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                for i in range(len(data)):
                    if srv._stop.wait(1.0 / srv.trickle_bps):
                        return
                    try:
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                    except OSError:  # the client gave up
                        return
            elif fault == "429":
                self._send(429, b'{"error": "rate limited"}', {"Retry-After": srv.retry_after})
            elif fault in ("500", "503", "401", "404"):
                self._send(int(fault), json.dumps({"error": f"injected {fault}"}).encode())
            elif fault == "bad_json":
                self._send(200, b"<html>this is not json")
            elif fault == "truncated":
                data = srv.answer(route, body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data) + 500))
                self.end_headers()
                self.wfile.write(data[:len(data) // 2])
                self.wfile.flush()
            elif fault == "garbage_status":
                self.wfile.write(b"HELLO garbage\r\n\r\n")
                self.wfile.flush()
            elif fault == "fewer_choices":
                self._send(200, srv.answer(route, body, n=1))
            elif fault == "close":
                pass

    return Handler


LETTERS = [chr(c) for c in range(ord("A"), ord("Z") + 1)]


class ToyProvider:
    """reply(route, body) of a simulated hosted API around a local text model (see the module docstring)."""

    KNOWN = {"model", "messages", "prompt", "n", "temperature", "max_tokens", "max_completion_tokens", "top_p", "stop",
             "seed", "stream"}

    def __init__(self, llm, style: str = "continue", restate: bool = False, strict: bool = False, tokenizer=None,
                 knows_probe: bool = True):
        if style not in ("completions", "continue", "prefill", "instruct"):
            raise ValueError(f"style must be completions, continue, prefill or instruct, not {style}")
        self.llm, self.style, self.restate, self.strict, self.knows_probe = llm, style, restate, strict, knows_probe
        self.tok = tokenizer if tokenizer is not None else getattr(llm, "_tok", None)
        self.routes = ("completions", "chat/completions") if style == "completions" else ("chat/completions",)
        self._lock = threading.Lock()  # the model is not thread-safe

    def count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"]) if self.tok is not None else len(text)

    def _text(self, route: str, body: dict) -> tuple[str, str, str]:
        """-> (the text the model continues, what is restated first, the prompt as billed)."""
        if route == "completions":
            return body["prompt"], "", body["prompt"]
        msgs = body["messages"]
        billed = "".join(m["content"] for m in msgs)
        users = [m["content"] for m in msgs if m["role"] == "user"]
        if msgs[-1]["role"] == "assistant":
            honoured = self.style in ("completions", "prefill") or (self.style == "continue"
                                                                     and body.get("continue_final_message"))
            return (users[-1] + msgs[-1]["content"] if honoured else users[-1]), "", billed
        last = msgs[-1]["content"]
        m = re.match(r"(.*?)\n\n[^\n]*:\n(.*)", last, re.S) if self.style == "instruct" else None
        if m:  # the instruction fallback: continue task + partial (restated first when restate)
            return m.group(1) + m.group(2), (m.group(2) if self.restate else ""), billed
        return last, "", billed

    def __call__(self, route: str, body: dict) -> dict:
        if self.strict:
            unknown = sorted(set(body) - self.KNOWN)
            if unknown:
                raise ValueError(f"Unrecognized request argument supplied: {', '.join(unknown)}")
        n = int(body.get("n") or 1)
        max_tokens = int(body.get("max_tokens") or 256)
        temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
        text, restated, billed = self._text(route, body)
        budget = max_tokens - self.count(restated)
        if self.knows_probe and "capital letters A to Z" in text:  # the start-up probe, as a capable model answers it
            run = re.search(r"([A-Z](?: [A-Z])*)\s*$", text)
            k = len(run.group(1).split()) if run and run.group(1).split() == LETTERS[:len(run.group(1).split())] else 0
            nxt = " ".join(LETTERS[k:])
            gen = [((" " if k and not text.endswith(" ") else "") + nxt)[:max(0, budget)]] * n
            reasons, made = ["stop"] * n, sum(self.count(g) for g in gen)
        elif budget <= 0:
            gen, reasons, made = [""] * n, ["length"] * n, 0
        else:
            with self._lock:
                before = self.llm.usage["completion_tokens"]
                outs, why = self.llm.complete([text], n=n, temperature=temperature, max_tokens=budget,
                                              return_finish=True)
                made = self.llm.usage["completion_tokens"] - before
            gen, reasons = outs[0], [r or "stop" for r in why[0]]
        texts = [restated + g for g in gen]
        reasons = [r if budget > 0 else "length" for r in reasons]
        return {"texts": texts, "finish_reasons": reasons,
                "usage": {"prompt_tokens": self.count(billed), "completion_tokens": made + n * self.count(restated)}}


def _serve_toy_provider(argv) -> None:
    import argparse
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import common as C

    ap = argparse.ArgumentParser(description="the toy teacher as a simulated hosted API")
    ap.add_argument("--toy_provider", required=True, choices=("completions", "continue", "prefill", "instruct"))
    ap.add_argument("--restate", action="store_true", help="instruct: write the partial answer again first")
    ap.add_argument("--strict", action="store_true", help="400 on request fields it does not know")
    ap.add_argument("--role", default="teacher", help="common.toy_checkpoint role of the model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args(argv)
    C.set_cpu_threads()
    llm = C.LLM.from_hf(C.toy_checkpoint(a.role), device="cpu", seed=a.seed)
    prov = ToyProvider(llm, a.toy_provider, restate=a.restate, strict=a.strict)
    with FaultServer(reply=prov, routes=prov.routes, port=a.port) as s:
        print(s.url, flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":  # a manual probe: python tests/fault_server.py hang 429 ...
    import sys

    if "--toy_provider" in sys.argv:
        _serve_toy_provider(sys.argv[1:])
        sys.exit(0)
    with FaultServer(sys.argv[1:]) as s:
        print(s.url, flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
