"""A stand-in for the ``vllm`` executable, for machines without a GPU (vLLM needs CUDA): ``vllm serve MODEL
--port N ...`` answers the few routes of vLLM's OpenAI server that posttrain's vLLM backend calls, and
writes each call (its command line and environment first) to the JSON-lines file in $STAND_IN_VLLM_RECORD.
Its answers say which model they were asked for, which is all the tests check. Installed by the tests as
an executable named ``vllm`` on PATH."""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RECORD = os.environ["STAND_IN_VLLM_RECORD"]
KEY = os.environ.get("VLLM_API_KEY")


def record(entry: dict) -> None:
    with open(RECORD, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *_args) -> None:
        pass

    def answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.answer(200 if self.path == "/health" else 404, b"{}")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        record({"path": self.path, "body": body, "authorized": self.headers.get("Authorization") == f"Bearer {KEY}"})
        if self.headers.get("Authorization") != f"Bearer {KEY}":
            self.answer(401, b'{"error": "unauthorized"}')
        elif self.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            self.answer(200, b"ok", "text/plain")
        elif self.path == "/v1/chat/completions":
            text = f"answered by {body['model']}"
            if body.get("stream"):
                chunks = [{"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                           "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
                          for word in text.split(" ")]
                events = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
                self.answer(200, events.encode(), "text/event-stream")
            else:
                self.answer(200, json.dumps({
                    "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}}).encode())
        else:
            self.answer(404, b"{}")


def main() -> None:
    argv = sys.argv[1:]
    record({"argv": argv, "lora_updating": os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING"), "key": bool(KEY)})
    assert argv[0] == "serve", argv
    port = int(argv[argv.index("--port") + 1])
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    main()
