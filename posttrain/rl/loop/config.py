"""The config of ``posttrain rl run``: one YAML file describing the whole online RL loop.

```yaml
model: posttrain:tiny             # the policy: served by the inference server, trained by the trainer
api: {port: 8000}                 # atroposlib's run-api
inference: {port: 9001}           # posttrain rl serve-inference (started by the trainer in mode none)
environments:                     # one process each: posttrain rl env NAME serve --env.* --openai.*
  - name: digits
    env: {group_size: 8}
trainer:                          # a JobSpec (method online_grpo), run by the one worker entrypoint
  method: {name: online_grpo, weight_bridge_mode: lora_only}
  peft: {type: lora}
  training: {max_steps: 20}
```

The addresses and the model are written once here and filled into every part: the trainer's
``model.name_or_path``, ``method.api_url`` and inference address, each environment's tokenizer, API URL and
server URL, so the parts cannot disagree.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from posttrain.errors import ConfigError
from posttrain.spec import (
    TINY_MODEL_NAME,
    JobSpec,
    Section,
    apply_overrides,
    check_depth,
    closest_name,
    load_yaml,
    spec_from_dict,
)

SCALAR = str | int | float | bool | None


class APISection(Section):
    host: str = Field("127.0.0.1", description="Interface run-api listens on.")
    port: int = Field(8000, gt=0, lt=65536, description="Port of run-api (the trainer's --api-url).")
    start_timeout: float = Field(120, gt=0, description="Seconds to wait for run-api to answer.")


class InferenceSection(Section):
    host: str = Field("127.0.0.1", description="Interface the inference server listens on.")
    port: int = Field(9001, gt=0, lt=65536, description="Port of the inference server (--vllm-port).")
    served_model_name: str | None = Field(None, description="Name the server answers to (default: the model).")
    args: list[str] = Field(default_factory=list, description="More `posttrain rl serve-inference` flags.")
    start_timeout: float = Field(600, gt=0, description="Seconds to wait for the server's /health.")


class EnvironmentSection(Section):
    name: str = Field(description="Built-in environment (gsm8k, digits) or module:ClassName.")
    env: dict[str, SCALAR] = Field(default_factory=dict, description="atroposlib --env.* settings.")
    openai: dict[str, SCALAR] = Field(default_factory=dict, description="atroposlib --openai.* settings.")
    start_timeout: float = Field(600, gt=0, description="Seconds to wait for it to register with run-api.")


class RunConfig(Section):
    name: str | None = Field(None, description="Run name (default: the config file's name).")
    model: str = Field(TINY_MODEL_NAME, description="Model to serve and train: embedded name, folder or hub id.")
    run_dir: str | None = Field(None, description="Where logs and the trainer's job dir go (default runs/<name>).")
    api: APISection = Field(default_factory=APISection)
    inference: InferenceSection = Field(default_factory=InferenceSection)
    environments: list[EnvironmentSection] = Field(min_length=1, description="Environments, one process each.")
    trainer: dict[str, Any] = Field(default_factory=dict, description="The trainer's JobSpec (online_grpo).")
    progress_interval: float = Field(5, gt=0, description="Seconds between progress lines.")
    stop_grace: float = Field(20, gt=0, description="Seconds each part gets to stop before it is killed.")

    @property
    def api_url(self) -> str:
        return f"http://{self.api.host}:{self.api.port}"

    @property
    def inference_url(self) -> str:
        return f"http://{self.inference.host}:{self.inference.port}"

    @property
    def served_model_name(self) -> str:
        return self.inference.served_model_name or self.model

    def directory(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / (self.name or "rl")

    def trainer_spec(self) -> JobSpec:
        """The trainer's JobSpec with the run's model and addresses filled in (errors name ``trainer.*``)."""
        data = apply_overrides(self.trainer, [])
        method = data.get("method")
        method = {"name": method} if isinstance(method, str) else dict(method or {})
        method.setdefault("name", "online_grpo")
        if method["name"] != "online_grpo":
            raise ConfigError(f"trainer.method.name must be online_grpo, got {method['name']!r}")
        method.setdefault("api_url", self.api_url)
        method.setdefault("inference_host", self.inference.host)
        method.setdefault("inference_port", self.inference.port)
        data["method"] = method
        # As `posttrain rl train` does: an adapter for lora_only, the whole model for the other bridges.
        data.setdefault("peft", {"type": "lora" if method.get("weight_bridge_mode") == "lora_only" else "none"})
        data.setdefault("model", {}).setdefault("name_or_path", self.model)
        data.setdefault("name", self.name)
        try:
            return spec_from_dict(data)
        except ConfigError as exc:
            # A whole-spec check has no key of its own: say "trainer:" and the check's own words.
            message = exc.message.removeprefix("<root>: ").removeprefix("Value error, ")
            if message.startswith("unknown key '"):  # the keys it names are the trainer's
                message = re.sub(r"'(?=[A-Za-z_])", "'trainer.", message)
            elif exc.path:
                message = f"trainer.{message}"
            else:
                message = f"trainer: {message}"
            raise ConfigError(message) from None


def _format(exc: ValidationError) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        path = ".".join(loc)
        if err["type"] == "extra_forbidden":
            model: type[Section] = RunConfig
            for part in loc[:-1]:
                annotation = model.model_fields[part].annotation if part in model.model_fields else None
                model = annotation if isinstance(annotation, type) and issubclass(annotation, Section) else model
            hint = closest_name(loc[-1], list(model.model_fields))
            lines.append(f"unknown key '{path}'" + (f"; did you mean '{hint}'?" if hint else ""))
        else:
            lines.append(f"{path or '<root>'}: {err['msg']}")
    return ConfigError("invalid rl run config:\n  " + "\n  ".join(lines) if len(lines) > 1 else lines[0])


def run_config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    check_depth(data, "the rl run config")
    data = apply_overrides(data, overrides or [])
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as exc:
        raise _format(exc) from None
    config.trainer_spec()  # the trainer's part is checked now, not when its process starts
    return config


def load_run_config(path: Path, overrides: list[str] | None = None) -> RunConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    config = run_config_from_dict(load_yaml(path.read_text(), str(path)), overrides)
    if config.name is None:
        config.name = path.stem
    return config
