"""`posttrain quickstart sft|rw|dpo|ppo key=value ...`: ReaLHF's quickstart keys, translated into one JobSpec.

ReaLHF users describe an experiment with hydra-style keys (``experiment_name``, ``model.path``,
``model.parallel.data_parallel_size``, ``dataset.train_tokens_per_batch``, ...). This module maps each key
onto the JobSpec field that means the same thing here, so the experiment runs through ``posttrain train``
like any other job. :data:`KEYS` is the one list of accepted keys: the parser, the error for an unknown key
and the table in docs/quickstart.md all come from it. A key is translated, ignored (only where ignoring
it cannot change the result; the run says so) or refused with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import ConfigError, UnsupportedError
from posttrain.spec import TINY_MODEL_NAME, JobSpec, closest_name, parse_override, spec_from_dict

# ReaLHF experiment -> posttrain method.
EXPERIMENTS = {"sft": "sft", "rw": "reward", "dpo": "dpo", "ppo": "ppo"}
NOT_YET: dict[str, str] = {}
# Model roles per experiment: the trained one first; the others only name a model (path, type). DPO's `ref`
# is the frozen reference; PPO's `critic` starts the value model, `rew` is the reward model, `ref` the reference.
ROLES = {"sft": ("model",), "rw": ("model",), "dpo": ("actor", "ref"), "ppo": ("actor", "critic", "ref", "rew")}
DEFAULT_DATA = {"sft": "posttrain:alpaca", "rw": "posttrain:preference", "dpo": "posttrain:preference",
                "ppo": "posttrain:preference"}
ALL = ("sft", "rw", "dpo", "ppo")
OFFLINE = ("sft", "rw", "dpo")  # keys of a fixed dataset's schedule, validation and sequence length
ALIASES = {"dataset.path": "dataset.train_path", "ppo.gen.max_new_tokens": "ppo.max_new_tokens",
           "ppo.gen.temperature": "ppo.temperature"}
PAIRS = ("rw", "dpo")
# ReaLHF names experiments and trials freely, but here they become two folder names.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class Key:
    """One accepted ReaLHF key: where it goes in the JobSpec (or why it is ignored), for which experiments."""

    name: str
    target: str
    experiments: tuple[str, ...] = ALL


# `<role>` stands for each model role of the experiment (model; for dpo actor, and ref where listed).
KEYS: tuple[Key, ...] = (
    Key("experiment_name", "name, tracking.project; the run goes to `<output-root>/<experiment_name>/<trial_name>`"),
    Key("trial_name", "name, tracking.run_name"),
    Key("seed", "training.seed"),
    Key("total_train_epochs", "training.num_train_epochs", OFFLINE),
    Key("save_freq", "training.save_steps (optimizer steps)"),
    Key("eval_freq", "training.eval_steps (optimizer steps; needs dataset.valid_path)", OFFLINE),
    Key("<role>.type", "ignored: transformers reads the architecture from the model's config.json"),
    Key("<role>.path", "model.name_or_path (for dpo ref.path: method.reference_model); posttrain:tiny, "
        "posttrain:smollm2, a folder or a hub id"),
    Key("critic.path", "method.critic_model (default: the reward model, as ReaLHF's critic starts from it)", ("ppo",)),
    Key("rew.path", "method.reward_model (required): a posttrain reward job's final/ or any sequence-classification "
        "model", ("ppo",)),
    Key("ref.path", "must be actor.path (or left out): PPO's reference is the actor's starting model (with LoRA, "
        "the base with the adapter off)", ("ppo",)),
    Key("<role>.gradient_checkpointing", "training.gradient_checkpointing"),
    Key("<role>.enable_bf16", "model.dtype=bf16 when true"),
    Key("<role>.enable_fp16", "model.dtype=fp16 when true"),
    Key("<role>.parallel.data_parallel_size", "distributed.data_parallel_size (torchrun with that many "
        "processes unless n_gpus_per_node says otherwise)"),
    Key("<role>.parallel.model_parallel_size", "distributed.tensor_parallel_size"),
    Key("<role>.parallel.pipeline_parallel_size", "distributed.pipeline_parallel_size (only 1 is supported)"),
    Key("<role>.parallel.use_sequence_parallel", "false: ignored; true: refused (not supported)"),
    Key("optimizer.type", "adam: training.optim=adamw_torch (ReaLHF's adam decouples weight decay)"),
    Key("optimizer.lr", "training.learning_rate"),
    Key("optimizer.weight_decay", "training.weight_decay"),
    Key("optimizer.lr_scheduler_type", "training.lr_scheduler_type (linear, cosine, constant)"),
    Key("optimizer.warmup_steps_proportion", "training.warmup_ratio"),
    Key("dataset.train_path", "data.source (any posttrain source: posttrain:alpaca, a .jsonl file, ...)"),
    Key("dataset.path", "alias of dataset.train_path"),
    Key("dataset.valid_path", "data.validation.source", OFFLINE),
    Key("dataset.max_seqlen", "training.max_seq_length", OFFLINE),
    Key("dataset.max_prompt_len", "method.max_prompt_length", ("ppo",)),
    Key("dataset.train_bs_n_seqs", "prompts per PPO step: training.per_device_train_batch_size = n / data-parallel "
        "size / ppo.ppo_n_minibatches", ("ppo",)),
    Key("dataset.train_tokens_per_batch", "sft: training.tokens_per_batch, divided by the data-parallel size "
        "(ReaLHF's budget is global, ours per device); rw/dpo: training.per_device_train_batch_size = the pairs "
        "that fit at full length (budget / data-parallel size / (2 x max_seqlen)); ppo: prompts per step = "
        "budget / (max_prompt_len + max_new_tokens), as with dataset.train_bs_n_seqs"),
    Key("dataset.valid_tokens_per_batch", "training.per_device_eval_batch_size = the rows (pairs) that fit at "
        "full length", OFFLINE),
    Key("beta", "method.beta", ("dpo",)),
    Key("critic_optimizer.lr", "method.critic_learning_rate (default: optimizer.lr)", ("ppo",)),
    *(Key(f"ppo.{name}", target, ("ppo",)) for name, target in (
        ("max_new_tokens", "method.response_length"),
        ("temperature", "method.temperature"),
        ("ppo_n_minibatches", "method.num_mini_batches"),
        ("kl_ctl", "method.kl_coef"),
        ("use_adaptive_kl_ctl", "false: ignored (fixed kl_coef); true: needs --set method.kl_target=X (the "
                                "adaptive controller's target KL)"),
        ("discount", "method.gamma"),
        ("gae_lambda", "method.lam"),
        ("eps_clip", "method.cliprange"),
        ("value_eps_clip", "method.cliprange_value"),
        ("max_reward_clipping", "method.reward_clip"),
        ("adv_norm", "method.whiten_advantages"),
        ("greedy", "false: ignored; true: refused (PPO learns from sampled answers)"),
        ("top_p", "1.0: ignored; below 1: refused (answers are sampled from the whole distribution)"),
        ("top_k", "0 or above the vocabulary size: ignored; otherwise refused (as top_p)"),
        ("min_new_tokens", "0: ignored; otherwise refused"),
        ("value_norm", "false: ignored; true: refused (use --set method.whiten_rewards=true)"),
        ("reward_output_scaling", "1.0: ignored; otherwise refused"),
        ("reward_output_bias", "0: ignored; otherwise refused"),
    )),
    Key("n_nodes", "distributed.nnodes (torchrun when more than one process)"),
    Key("n_gpus_per_node", "distributed.nproc_per_node (torchrun when more than one process)"),
    Key("allocation_mode", "manual: the `model.parallel.*` sizes; pipe_data: data parallel over n_gpus_per_node; "
        "pipe_model: tensor parallel over n_gpus_per_node (both on one node: no pipeline); search and "
        "heuristic: refused"),
    Key("mode", "local: ignored (posttrain runs here); slurm, ray: refused (use torchrun or posttrain kfp)"),
    Key("wandb_mode", "disabled: tracking.report_to=[] (the quickstart's default); online: [wandb]"),
    Key("recover_mode", "disabled, save: ignored (checkpoints are always kept); auto, resume: --resume"),
    Key("recover_retries", "ignored (the job service retries jobs; a CLI run is resumed with --resume)"),
    Key("debug", "ignored (ReaLHF's internal assertions)"),
    Key("partition", "ignored (a Slurm partition; nothing is submitted to Slurm)"),
    Key("image_name", "ignored (a Slurm container image; nothing is submitted to Slurm)"),
    Key("allocation_use_cache", "ignored (cache of ReaLHF's allocation search)"),
)


@dataclass
class Translation:
    """A quickstart command line turned into a JobSpec, plus what the user should be told about it."""

    experiment: str
    spec: JobSpec
    resume: bool = False
    ignored: list[str] = field(default_factory=list)

    @property
    def job_dir(self) -> Path:
        """`<output-root>/<experiment_name>/<trial_name>`, unless ``--set output.dir=...`` moved it."""
        return Path(self.spec.output.dir or ".")

    def yaml(self) -> str:
        """The JobSpec as YAML (only the keys the translation set): ``posttrain train`` runs this file as is."""
        data = self.spec.model_dump(mode="json", exclude_unset=True)
        header = [f"# posttrain quickstart {self.experiment}: the JobSpec it runs (posttrain train FILE runs it too)"]
        header += [f"# ignored: {note}" for note in self.ignored]
        return "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False)


def keys_for(experiment: str) -> list[str]:
    """Every key the experiment accepts, with `<role>` expanded to its model roles."""
    names: list[str] = []
    roles = ROLES[experiment]
    for key in KEYS:
        if experiment not in key.experiments:
            continue
        if not key.name.startswith("<role>."):
            names.append(key.name)
            continue
        rest = key.name.removeprefix("<role>.")
        # Only the first role is trained: of the others (dpo's and ppo's reference, ppo's critic and reward
        # model) only the path and type mean something.
        names += [f"{role}.{rest}" for role in roles if role == roles[0] or rest in ("path", "type")]
    names = list(dict.fromkeys(names))  # ppo's critic/ref/rew.path have keys of their own as well
    return names


def keys_table() -> str:
    """The Markdown table of docs/quickstart.md, generated from :data:`KEYS`."""
    lines = ["| ReaLHF key | experiments | posttrain JobSpec |", "|---|---|---|"]
    for key in KEYS:
        name = f"`{key.name}`"
        if key.name.startswith("<role>."):
            rest = key.name.removeprefix("<role>.")
            dpo = ["actor"] + (["ref"] if rest in ("path", "type") else [])
            ppo = ["actor"] + (["critic", "ref", "rew"] if rest == "type" else [])
            name = (f"`model.{rest}` (dpo: {', '.join(f'`{role}.{rest}`' for role in dpo)}; "
                    f"ppo: {', '.join(f'`{role}.{rest}`' for role in ppo)})")
        lines.append(f"| {name} | {', '.join(key.experiments)} | {key.target} |")
    return "\n".join(lines)


def key_info(key: str, experiment: str | None = None) -> Key:
    """The :data:`KEYS` entry of an accepted (expanded) key (of ``experiment``, where it matters)."""
    role, _, rest = key.partition(".")
    entries = [entry for entry in KEYS if experiment is None or experiment in entry.experiments]
    for entry in entries:  # a key of its own (ppo's rew.path) before the <role> pattern
        if entry.name == key:
            return entry
    for entry in entries:
        if role in ("model", "actor", "ref", "critic", "rew") and entry.name == f"<role>.{rest}":
            return entry
    raise KeyError(key)


def parse_keys(experiment: str, pairs: list[str]) -> dict[str, Any]:
    """``key=value`` texts into {key: value}, values parsed as YAML; unknown keys get the closest known one."""
    known = keys_for(experiment)
    values: dict[str, Any] = {}
    for text in pairs:
        parts, value = parse_override(text.removeprefix("+"))  # hydra's `+key=value` adds a key: same here
        key = ".".join(parts)
        if key not in known:
            # A model key under another experiment's role name (actor.path in sft) means this one's role.
            role, _, rest = key.partition(".")
            same = f"{ROLES[experiment][0]}.{rest}"
            hint = same if role in ("model", "actor", "ref", "critic", "rew") and same in known else closest_name(key, known)
            message = f"unknown key '{key}' for quickstart {experiment}"
            raise ConfigError(message + (f"; did you mean '{hint}'?" if hint else f" (valid keys: {', '.join(known)})"))
        canonical = ALIASES.get(key, key)
        if canonical in values:
            also = f" (as {next(a for a, t in ALIASES.items() if t == canonical)} or {canonical})" \
                if canonical in ALIASES.values() else ""
            raise ConfigError(f"'{key}' is given twice{also}")
        values[canonical] = value
    return values


def _int(values: dict[str, Any], key: str, default: int | None = None) -> int | None:
    value = values.get(key, default)
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise ConfigError(f"{key}={value!r}: expected a positive whole number")


def _bool(values: dict[str, Any], key: str) -> bool | None:
    value = values.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise ConfigError(f"{key}={value!r}: expected true or false")


def _name(values: dict[str, Any], key: str) -> str:
    value = values.get(key)
    if value is None:
        raise ConfigError(f"{key} is required (ReaLHF requires it too): the run goes to "
                          "<output-root>/<experiment_name>/<trial_name>")
    text = str(value)
    if not NAME_PATTERN.match(text) or ".." in text:
        raise ConfigError(f"{key}={text!r}: use letters, digits and . _ - (it names a folder)")
    return text


def _choice(values: dict[str, Any], key: str, choices: dict[str, Any]) -> Any:
    value = values.get(key)
    if value is None:
        return None
    if str(value) not in choices:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(choices)}")
    return choices[str(value)]


def translate(experiment: str, pairs: list[str], output_root: str | Path = "runs",
              overrides: list[str] | None = None) -> Translation:
    """Translate a quickstart command line into one validated JobSpec (``overrides``: JobSpec ``a.b=c`` keys
    applied last, for what ReaLHF has no key for, such as ``training.max_steps``)."""
    if experiment in NOT_YET:
        raise UnsupportedError(f"quickstart {experiment}: {NOT_YET[experiment]}")
    if experiment not in EXPERIMENTS:
        raise ConfigError(f"unknown quickstart experiment {experiment!r}; expected one of "
                          f"{', '.join([*EXPERIMENTS, *NOT_YET])}")
    values = parse_keys(experiment, pairs)
    ignored: list[str] = []
    role = ROLES[experiment][0]
    experiment_name, trial_name = _name(values, "experiment_name"), _name(values, "trial_name")
    job_dir = Path(output_root) / experiment_name / trial_name
    model: dict[str, Any] = {"name_or_path": values.get(f"{role}.path", TINY_MODEL_NAME)}
    method: dict[str, Any] = {"name": EXPERIMENTS[experiment]}
    training: dict[str, Any] = {}
    data: dict[str, Any] = {"source": values.get("dataset.train_path", DEFAULT_DATA[experiment])}
    tracking: dict[str, Any] = {"report_to": [], "project": experiment_name, "run_name": trial_name}

    for key in ("mode", "wandb_mode", "recover_mode", "allocation_mode"):
        if key in values:
            values[key] = str(values[key])
    # Where things run.
    mode = values.get("mode")
    if mode in ("slurm", "ray"):
        raise UnsupportedError(f"mode={mode}: posttrain does not submit to {mode}; run the same command on each "
                               "node (n_nodes, distributed.node_rank and distributed.rdzv_endpoint through --set) "
                               "or use `posttrain kfp run` for a Kubernetes cluster")
    _choice(values, "mode", {"local": None, "slurm": None, "ray": None})
    trackers = _choice(values, "wandb_mode", {"disabled": [], "online": ["wandb"]})
    if trackers is not None:
        tracking["report_to"] = trackers
    resume = bool(_choice(values, "recover_mode", {"disabled": False, "save": False, "auto": True, "resume": True}))

    distributed, data_parallel = _layout(values, role)
    if experiment == "ppo" and distributed.get("launcher") == "torchrun":
        raise UnsupportedError("quickstart ppo: PPO runs in a single process only, for now; drop n_gpus_per_node, "
                               "n_nodes and the actor.parallel.* sizes (or set them to 1)")

    # Model.
    bf16, fp16 = _bool(values, f"{role}.enable_bf16"), _bool(values, f"{role}.enable_fp16")
    if bf16 and fp16:
        raise ConfigError(f"{role}.enable_bf16 and {role}.enable_fp16 are both true; choose one")
    if bf16 or fp16:
        model["dtype"] = "bf16" if bf16 else "fp16"
    checkpointing = _bool(values, f"{role}.gradient_checkpointing")
    if checkpointing is not None:
        training["gradient_checkpointing"] = checkpointing
    if experiment == "ppo":
        method.update(_ppo_method(values, model["name_or_path"]))
    if experiment == "dpo":
        if "beta" in values:
            method["beta"] = values["beta"]
        reference = values.get("ref.path")
        if reference is not None and reference != model["name_or_path"]:
            method["reference_model"] = reference

    # Schedule and optimizer.
    for key, target in (("seed", "seed"), ("total_train_epochs", "num_train_epochs"), ("save_freq", "save_steps"),
                        ("eval_freq", "eval_steps"), ("optimizer.lr", "learning_rate"),
                        ("optimizer.weight_decay", "weight_decay"), ("optimizer.lr_scheduler_type", "lr_scheduler_type"),
                        ("optimizer.warmup_steps_proportion", "warmup_ratio")):
        if key in values:
            training[target] = values[key]
    if _choice(values, "optimizer.type", {"adam": "adamw_torch"}):
        training["optim"] = "adamw_torch"

    # Data and batches.
    if "dataset.valid_path" in values:
        data["validation"] = {"source": values["dataset.valid_path"]}
    max_seqlen = _int(values, "dataset.max_seqlen")
    if max_seqlen is not None:
        training["max_seq_length"] = max_seqlen
    seqlen = max_seqlen or JobSpec().training.max_seq_length
    row_tokens = seqlen * (2 if experiment in PAIRS else 1)  # a pair is chosen + rejected
    train_budget = _int(values, "dataset.train_tokens_per_batch")
    if experiment == "ppo":
        training.update(_ppo_batch(values, method, data_parallel))
    elif train_budget is not None:
        per_device = train_budget // data_parallel
        if experiment in PAIRS:
            training["per_device_train_batch_size"] = max(1, per_device // row_tokens)
        else:
            training["tokens_per_batch"] = per_device
    valid_budget = _int(values, "dataset.valid_tokens_per_batch")
    if valid_budget is not None:
        training["per_device_eval_batch_size"] = max(1, valid_budget // data_parallel // row_tokens)

    for key, value in values.items():
        target = key_info(key, experiment).target
        if target.startswith("ignored"):
            ignored.append(f"{key}={value}: {target.removeprefix('ignored').strip(' :()')}")
        elif experiment == "ppo" and key == "ref.path":  # refused above unless it is the actor's own path
            ignored.append(f"{key}={value}: the reference is the actor's starting model")
        elif _neutral(key, value) or (value in ("local", "disabled", "save", "manual", False) and (
                key in ("mode", "recover_mode", "allocation_mode") or key.endswith("use_sequence_parallel"))):
            ignored.append(f"{key}={value}")

    document = {
        "name": f"{experiment_name}-{trial_name}",
        "model": model,
        "method": method,
        # ReaLHF trains every weight; --set peft.type=lora trains an adapter instead.
        "peft": {"type": "none"},
        "data": data,
        "training": training,
        "output": {"dir": str(job_dir)},
        "tracking": tracking,
    }
    if distributed:
        document["distributed"] = distributed
    try:
        spec = spec_from_dict(document, overrides)
    except ConfigError as exc:
        message = "\n".join(line + _blame(line, values) for line in exc.message.splitlines())
        raise ConfigError(f"quickstart {experiment}: {message}") from None
    if values.get("ppo.use_adaptive_kl_ctl") is True and getattr(spec.method, "kl_target", None) is None:
        raise ConfigError("quickstart ppo: ppo.use_adaptive_kl_ctl=true needs the controller's target KL: "
                          "--set method.kl_target=X (ReaLHF's adaptive controller takes it from its own config)")
    return Translation(experiment, spec, resume, ignored)


def _layout(values: dict[str, Any], role: str) -> tuple[dict[str, Any], int]:
    """The `distributed` section from ReaLHF's node, GPU and parallel-size keys, and the data-parallel size."""
    distributed: dict[str, Any] = {}
    n_nodes, n_gpus = _int(values, "n_nodes"), _int(values, "n_gpus_per_node")
    dp = _int(values, f"{role}.parallel.data_parallel_size")
    tp = _int(values, f"{role}.parallel.model_parallel_size")
    pp = _int(values, f"{role}.parallel.pipeline_parallel_size")
    allocation = _choice(values, "allocation_mode", {key: key for key in
                                                     ("manual", "pipe_data", "pipe_model", "search", "heuristic")})
    if allocation in ("search", "heuristic"):
        raise UnsupportedError(f"allocation_mode={allocation}: posttrain has no allocation search; use "
                               f"allocation_mode=manual with {role}.parallel.* sizes")
    if allocation in ("pipe_data", "pipe_model"):
        if (n_nodes or 1) > 1:
            raise UnsupportedError(f"allocation_mode={allocation} with n_nodes={n_nodes} pipelines across nodes, "
                                   "and pipeline parallelism is not supported; use allocation_mode=manual with "
                                   f"{role}.parallel.data_parallel_size")
        size = n_gpus or 1
        dp, tp = (size, tp) if allocation == "pipe_data" else (dp, size)
    if _bool(values, f"{role}.parallel.use_sequence_parallel"):
        raise UnsupportedError(f"{role}.parallel.use_sequence_parallel=true is not supported; see "
                               "distributed.context_parallel_size")
    if dp is not None:
        distributed["data_parallel_size"] = dp
    if tp is not None:
        distributed["tensor_parallel_size"] = tp
    if pp is not None:
        distributed["pipeline_parallel_size"] = pp
    if n_nodes is not None:
        distributed["nnodes"] = n_nodes
    processes = n_gpus if n_gpus is not None else (dp or 1) * (tp or 1)
    if n_gpus is not None or processes > 1:
        distributed["nproc_per_node"] = processes
    if processes * (n_nodes or 1) > 1:
        distributed["launcher"] = "torchrun"
    data_parallel = dp or max(1, processes * (n_nodes or 1) // (tp or 1))
    return distributed, data_parallel


def _blame(message: str, values: dict[str, Any]) -> str:
    """' (from KEY=VALUE)' for the quickstart key whose JobSpec key a spec error names, if one does."""
    for key, value in values.items():
        target = key_info(key).target.split(" ")[0].rstrip(",;:")
        if "." in target and (target in message or re.search(rf"\b{re.escape(target.rsplit('.', 1)[1])}\b", message)):
            return f" (from {key}={value})"
    return ""


# ReaLHF ppo.* keys that map one to one onto PPOMethod fields.
PPO_FIELDS = {"ppo.max_new_tokens": "response_length", "ppo.temperature": "temperature",
              "ppo.ppo_n_minibatches": "num_mini_batches", "ppo.kl_ctl": "kl_coef", "ppo.discount": "gamma",
              "ppo.gae_lambda": "lam", "ppo.eps_clip": "cliprange", "ppo.value_eps_clip": "cliprange_value",
              "ppo.max_reward_clipping": "reward_clip", "ppo.adv_norm": "whiten_advantages",
              "dataset.max_prompt_len": "max_prompt_length", "critic_optimizer.lr": "critic_learning_rate"}
# Sampling and reward-shaping keys posttrain has no equivalent for: accepted only at the value that changes
# nothing (the run then says they were ignored), refused otherwise.
PPO_NEUTRAL = {"ppo.greedy": (False,), "ppo.top_p": (1, 1.0), "ppo.min_new_tokens": (0,), "ppo.value_norm": (False,),
               "ppo.reward_output_scaling": (1, 1.0), "ppo.reward_output_bias": (0, 0.0),
               "ppo.use_adaptive_kl_ctl": (False, True)}


def _neutral(key: str, value: Any) -> bool:
    """A ppo.* key at the value that changes nothing (reported as ignored)."""
    if key == "ppo.use_adaptive_kl_ctl":
        return value is False
    if key == "ppo.top_k":
        return value == 0 or (isinstance(value, int) and value >= 10**6)
    return key in PPO_NEUTRAL and value in PPO_NEUTRAL[key]


def _ppo_method(values: dict[str, Any], actor: str) -> dict[str, Any]:
    """PPOMethod fields from the critic/ref/rew paths and the ppo.* hyper-parameters."""
    method: dict[str, Any] = {}
    if "rew.path" not in values:
        raise ConfigError("quickstart ppo: rew.path is required (the reward model: a posttrain reward job's "
                          "final/, e.g. from `posttrain quickstart rw`, or any sequence-classification model)")
    method["reward_model"] = values["rew.path"]
    if "critic.path" in values:
        method["critic_model"] = values["critic.path"]
    reference = values.get("ref.path")
    if reference is not None and reference != actor:
        raise UnsupportedError(f"ref.path={reference}: PPO's reference model is the actor's starting model "
                               f"(actor.path={actor}); leave ref.path out or set it to actor.path")
    for key, target in PPO_FIELDS.items():
        if key in values:
            method[target] = values[key]
    top_k = values.get("ppo.top_k")
    if top_k not in (None, 0) and not (isinstance(top_k, int) and top_k >= 10**6):
        raise UnsupportedError(f"ppo.top_k={top_k}: answers are sampled from the whole distribution (with "
                               "ppo.temperature); top-k sampling is not supported")
    for key, neutral in PPO_NEUTRAL.items():
        if key in values and values[key] not in neutral:
            raise UnsupportedError(f"{key}={values[key]}: not supported ({key_info(key, 'ppo').target})")
    return method


def _ppo_batch(values: dict[str, Any], method: dict[str, Any], data_parallel: int) -> dict[str, Any]:
    """training.per_device_train_batch_size from the prompts per PPO step (dataset.train_bs_n_seqs, or a token
    budget over prompt + answer length), split over data-parallel ranks and PPO mini-batches."""
    prompts = _int(values, "dataset.train_bs_n_seqs")
    budget = _int(values, "dataset.train_tokens_per_batch")
    if prompts is not None and budget is not None:
        raise ConfigError("give dataset.train_bs_n_seqs or dataset.train_tokens_per_batch, not both")
    if budget is not None:
        defaults = JobSpec.model_validate({"method": {"name": "ppo", "reward_model": "x"},
                                           "training": {"max_steps": 1}}).method
        row = (method.get("max_prompt_length", defaults.max_prompt_length)  # type: ignore[union-attr]
               + method.get("response_length", defaults.response_length))  # type: ignore[union-attr]
        prompts = max(1, budget // row)
    if prompts is None:
        return {}
    minibatches = method.get("num_mini_batches", 1)
    per_device = prompts // (data_parallel * minibatches)
    if per_device < 1 or per_device * data_parallel * minibatches != prompts:
        raise ConfigError(f"{prompts} prompts per step do not split evenly over {data_parallel} data-parallel "
                          f"rank(s) x {minibatches} mini-batch(es) (ppo.ppo_n_minibatches)")
    return {"per_device_train_batch_size": per_device}
