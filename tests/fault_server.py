"""A small fault-injecting OpenAI-compatible HTTP server for tests (stdlib only, 127.0.0.1).

    from fault_server import FaultServer

    with FaultServer(["429", "ok"]) as srv:         # 1st POST: 429, then every later POST: "ok"
        client = common.ChatClient(srv.url, "m", deadline=5)
        client.complete("x", n=2)                    # survives the 429
        srv.requests                                 # [{"route": "completions", "body": {...}, "fault": "429"}, ...]

    FaultServer(faults, then="ok", reply=None, retry_after=1, trickle_bps=5)
      faults      one fault per POST, in order (GET /v1/models always answers); when they run out,
                  every further POST gets `then` (e.g. then="hang": a server that hangs after the
                  preflight's first request succeeded)
      reply       reply(route, body) -> [text] * n for "ok" answers (default: "033;" n times)
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

`srv.url` is the base URL ("http://127.0.0.1:PORT/v1"); `srv.requests` records every POST;
`srv.close()` (or leaving the `with`) stops the server and releases hung handlers.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Sequence

FAULTS = ("ok", "hang", "trickle", "429", "500", "503", "401", "404", "bad_json", "truncated", "garbage_status",
          "fewer_choices", "close")


class FaultServer:
    def __init__(self, faults: Sequence[str] = (), then: str = "ok", reply: Callable[[str, dict], list[str]] | None = None,
                 retry_after: float | str = 1, trickle_bps: float = 5.0, host: str = "127.0.0.1"):
        bad = [f for f in [*faults, then] if f not in FAULTS]
        if bad:
            raise ValueError(f"unknown faults {bad}; known: {', '.join(FAULTS)}")
        self.faults, self.then = list(faults), then
        self.reply = reply or (lambda route, body: ["033;"] * int(body.get("n", 1) or 1))
        self.retry_after, self.trickle_bps = str(retry_after), float(trickle_bps)
        self.requests: list[dict] = []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._server = ThreadingHTTPServer((host, 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def next_fault(self, route: str, body: dict) -> str:
        with self._lock:
            fault = self.faults.pop(0) if self.faults else self.then
            self.requests.append({"route": route, "body": body, "fault": fault})
        return fault

    def answer(self, route: str, body: dict, n: int | None = None) -> bytes:
        """A valid OpenAI-style JSON answer for the route (n choices, default the request's n)."""
        texts = self.reply(route, body)
        if n is not None:
            texts = texts[:n]
        if route.endswith("chat/completions"):
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                       for i, t in enumerate(texts)]
        else:
            choices = [{"index": i, "text": t, "finish_reason": "stop"} for i, t in enumerate(texts)]
        usage = {"prompt_tokens": 1, "completion_tokens": sum(len(t) for t in texts)}
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
            route = self.path.split("/v1/", 1)[-1]
            fault = srv.next_fault(route, body)
            self.close_connection = True
            if fault == "ok":
                self._send(200, srv.answer(route, body))
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


if __name__ == "__main__":  # a manual probe: python tests/fault_server.py hang 429 ...
    import sys

    with FaultServer(sys.argv[1:]) as s:
        print(s.url, flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
