"""Runs under Llama Stack's Python 3.12 environment (llama-stack-client needs >= 3.12): one call of the
official client per invocation, its arguments and its answer as JSON.

    python ls_client.py URL register|sft|dpo|list|get|stale-status|chat|chat-stream|models|register-model \
        '<json kwargs>'

Prints the answer's ``model_dump`` or ``{"error": {"status": ..., "message": ...}}`` for an API error.
A status, artifacts or cancel call is not here: llama-stack-client 0.6.1 sends those to stale paths
(``/job/status?job_uuid=``) that a 0.6.1 server answers 404, so the tests call those routes over HTTP.
"""

from __future__ import annotations

import json
import sys

from llama_stack_client import APIStatusError, LlamaStackClient


def main() -> None:
    url, action, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    # A fresh client per call: a 0.6.1 server drops the connection after answering a provider error.
    client = LlamaStackClient(base_url=url, max_retries=0, timeout=120)
    calls = {
        "register": client.beta.datasets.register,
        "sft": client.alpha.post_training.supervised_fine_tune,
        "dpo": client.alpha.post_training.preference_optimize,
        "list": client.alpha.post_training.job.list,
        # The documented workaround for the stale routes, and one stale route itself (to notice a fix).
        "get": lambda path: client.get(path, cast_to=object),
        "stale-status": client.alpha.post_training.job.status,
        # Llama Stack's own inference API: chat with what was trained.
        "chat": client.chat.completions.create,
        "chat-stream": lambda **kw: list(client.chat.completions.create(stream=True, **kw)),
        "models": client.models.list,
        "register-model": client.models.register,
    }
    try:
        answer = calls[action](**kwargs)
    except APIStatusError as exc:
        print(json.dumps({"error": {"status": exc.status_code, "message": str(exc)}}))
        return
    if isinstance(answer, dict):
        print(json.dumps(answer))
    elif isinstance(answer, list):
        print(json.dumps([item.model_dump(mode="json") for item in answer]))
    else:
        print(json.dumps(answer.model_dump(mode="json")))


if __name__ == "__main__":
    main()
