"""A local OpenAI-compatible chat-completions server with scripted failures, for testing the
`openai` backend over real HTTP.

`script[caption]` lists what each successive request for that caption gets: "ok", "timeout"
(answers after the client gave up), "500", "429", "400" (a request the server will not take),
"401" (a wrong key, echoed in the error as some servers do), "malformed", "fenced" (valid JSON
inside a code fence), "unchanged" (output equals input), "empty" or "nochoices" (an answer with an
empty `choices` list). Once a caption's list is used up it gets
"ok". An "ok" answer is `reply(user message)` as JSON (default: an edit of the caption). Every
request is logged with its caption and Authorization header.
"""
from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


def edited(caption: str) -> dict:
    return {"edit": "make it rain", "output": f"{caption} in the rain"}


def pairs_reply(user: str) -> dict:
    """A sentence-pairs answer (manip.ip2p.sentences): N pairs of the shown edit, then one unusable
    pair with identical sides."""
    lines = dict(line.split(": ", 1) for line in user.splitlines())
    pairs = [{"source": f"{lines['caption']} scene {i}", "target": f"{lines['edited caption']} scene {i}"}
             for i in range(int(lines["N"]))]
    return {"pairs": [*pairs, {"source": "same", "target": "same"}]}


class ScriptedLLM:
    def __init__(self, script: dict[str, list[str]] | None = None, delay: float = 6.0,
                 reply: Callable[[str], dict] = edited):
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.reply = reply
        self.delay = delay
        self.log: list[dict] = []
        self.counts: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def action(self, caption: str) -> str:
        with self.lock:
            n = self.counts[caption]
            self.counts[caption] += 1
        steps = self.script.get(caption, [])
        return steps[n] if n < len(steps) else "ok"

    def content(self, action: str, caption: str) -> str:
        if action == "malformed":
            return "Sure! Here is the edit: make it rain"
        if action == "fenced":
            return "```json\n" + json.dumps(self.reply(caption)) + "\n```"
        if action == "unchanged":
            return json.dumps({"edit": "keep it", "output": caption})
        if action == "empty":
            return ""
        return json.dumps(self.reply(caption))


def _handler(llm: ScriptedLLM):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            caption = body["messages"][-1]["content"]
            llm.log.append({"caption": caption, "authorization": self.headers.get("Authorization", ""),
                            "path": self.path, "body": body})
            action = llm.action(caption)
            if action == "timeout":
                time.sleep(llm.delay)
            if action == "500":
                return self._send(500, {"error": {"message": "internal error", "type": "server_error"}})
            if action == "429":
                return self._send(429, {"error": {"message": "slow down", "type": "rate_limit"}}, {"Retry-After": "0"})
            if action == "400":
                return self._send(400, {"error": {"message": "bad request", "type": "invalid_request_error"}})
            if action == "401":
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                return self._send(401, {"error": {"message": f"Incorrect API key provided: {key}",
                                                  "type": "invalid_request_error"}})
            choices = [] if action == "nochoices" else [
                {"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": llm.content(action, caption)}}]
            self._send(200, {
                "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": choices,
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            })

    return Handler


@contextmanager
def serve(llm: ScriptedLLM):
    """Yields the base URL ("http://127.0.0.1:PORT/v1") while the server runs."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(llm))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
