"""A ready Llama Stack run.yaml for posttrain's providers (``posttrain llama-stack config``): post_training
(train) and inference (chat with what was trained), both inline or both remote.

Everything it stores lives under one data dir, and the server binds loopback only: Llama Stack binds all
interfaces when run.yaml names no host.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import yaml

from posttrain.llama_stack.config import DEFAULT_SERVICE_URL

Provider = Literal["inline", "remote"]
PROVIDERS_DIR = Path(__file__).parent / "providers.d"
LLAMA_STACK_PORT = 8321


def run_config(provider: Provider, data_dir: str | Path, *, port: int = LLAMA_STACK_PORT,
               worker_python: str | None = None, url: str = DEFAULT_SERVICE_URL, api_key: str | None = None,
               providers_d: bool = False) -> dict[str, Any]:
    """The run.yaml as a dict. ``providers_d``: load the provider through the (deprecated) providers.d
    folder shipped with posttrain instead of ``module:``."""
    root = Path(data_dir).expanduser().resolve()
    if provider == "inline":
        config: dict[str, Any] = {"data_dir": str(root / "posttrain"),
                                  "worker_python": worker_python or sys.executable}
    else:
        config = {"url": url, **({"api_key": api_key} if api_key else {})}
    entry: dict[str, Any] = {"provider_id": "posttrain", "provider_type": f"{provider}::posttrain", "config": config}
    # Serves what the post_training provider trains (its ServiceCore, or its service): no config of its own.
    inference: dict[str, Any] = {"provider_id": "posttrain", "provider_type": f"{provider}::posttrain", "config": {}}
    if not providers_d:
        entry["module"] = "posttrain.llama_stack"
        inference["module"] = "posttrain.llama_stack.inference"
    run: dict[str, Any] = {
        "version": 2,
        "distro_name": f"posttrain-{provider}",
        "apis": ["datasetio", "inference", "post_training"],
        "providers": {
            "post_training": [entry],
            "inference": [inference],
            "datasetio": [{"provider_id": "localfs", "provider_type": "inline::localfs",
                           "config": {"kvstore": {"namespace": "datasetio::localfs", "backend": "kv_default"}}}],
        },
        "storage": {
            "backends": {
                "kv_default": {"type": "kv_sqlite", "db_path": str(root / "llama-stack" / "kvstore.db")},
                "sql_default": {"type": "sql_sqlite", "db_path": str(root / "llama-stack" / "sql_store.db")},
            },
            "stores": {
                "metadata": {"namespace": "registry", "backend": "kv_default"},
                "inference": {"table_name": "inference_store", "backend": "sql_default"},
                "conversations": {"table_name": "openai_conversations", "backend": "sql_default"},
                "prompts": {"namespace": "prompts", "backend": "kv_default"},
            },
        },
        "registered_resources": {"models": [], "datasets": []},
        "server": {"host": "127.0.0.1", "port": port},
    }
    if providers_d:
        run["external_providers_dir"] = str(PROVIDERS_DIR)
    return run


def run_yaml(provider: Provider, data_dir: str | Path, **options: Any) -> str:
    return yaml.safe_dump(run_config(provider, data_dir, **options), sort_keys=False)
