"""The run of every TRL method (sft, dpo, reward, grpo): data -> trainer -> train -> final/.

Read top to bottom: load and check the data, set up the job's evaluation (``posttrain.eval``), build the
method's trainer (``recipes.<method>``) with the callbacks that keep the job directory current, prepare it for
torchrun (DDP/FSDP2), continue from the newest complete checkpoint when resuming, train, save ``final/``.
"""

from __future__ import annotations

import logging
from typing import Any

from posttrain.data import PreparedData, load_held_out
from posttrain.data.eval_rows import sample_indices
from posttrain.errors import DatasetError
from posttrain.eval.runner import TRAINER_METRICS, Evaluator
from posttrain.job.context import RunContext
from posttrain.job.final import save_final
from posttrain.job.ranks import record_status
from posttrain.job.result import JobResult
from posttrain.job.resume import starting_point
from posttrain.spec import JobSpec, ValidationSpec

log = logging.getLogger("posttrain.worker")


def run(context: RunContext) -> JobResult:
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as HFProgressCallback

    from posttrain.data import load_training_data
    from posttrain.distributed.runtime import barrier
    from posttrain.modeling import load_tokenizer
    from posttrain.recipes import RecipeInputs, build_trainer
    from posttrain.recipes.callbacks import EvalCallback, JobDirCallback, ProgressCallback
    from posttrain.recipes.common import compile_decoder_layers, record_settings, use_compile

    spec, jd, stop, result, placement = context.spec, context.job_dir, context.stop, context.result, context.placement
    data_spec = spec.data
    if spec.eval.data is not None:  # eval.data replaces data.validation
        data_spec = data_spec.model_copy(update={"validation": ValidationSpec()})
    data = load_training_data(data_spec, spec.method.name, seed=spec.training.seed)
    if data.skipped:
        log.warning("skipped %d malformed rows of %s (data.on_bad_row=skip)", data.skipped, data.source)
    log.info("data: %d training rows (%s format)%s", len(data.train), data.format,
             f", {len(data.eval)} validation rows" if data.eval is not None else "")
    tokenizer = load_tokenizer(spec)
    metrics_cb = JobDirCallback(jd, stop, {"num_threads": context.threads,
                                           "dtype": str(placement.dtype).removeprefix("torch.")})
    callbacks = [metrics_cb, ProgressCallback(metrics_cb, f"{spec.method.name}"), *context.extra_callbacks]
    trainer_eval = trainer_held_out(spec, data)
    evaluator = Evaluator.for_job(spec, jd, split_rows=data.eval,
                                  trainer_metrics=TRAINER_METRICS[spec.method.name] if trainer_eval is not None else ())
    data.eval = trainer_eval if evaluator is not None else None
    eval_cb = EvalCallback(evaluator, trainer_evaluates=trainer_eval is not None) if evaluator is not None else None
    if eval_cb is not None:
        callbacks.append(eval_cb)
    eval_steps = evaluator.every if evaluator is not None and trainer_eval is not None else None
    inputs = RecipeInputs(spec, jd, placement, data, tokenizer, callbacks, eval_steps)
    trainer = build_trainer(inputs)
    num_params = sum(p.numel() for p in trainer.model.parameters())
    # GRPO samples from its training model unless its rollouts go through the engine (TRL's rollout_func).
    samples = spec.method.name == "grpo" and getattr(trainer, "rollout_func", None) is None
    compiled = compile_decoder_layers(trainer.model) if use_compile(spec, placement, num_params, samples) else 0
    record_settings(inputs, compiled_layers=compiled)
    if compiled:
        log.info("compiled %d decoder layers (training.compile=%s)", compiled, spec.training.compile)
    if eval_cb is not None:
        eval_cb.trainer = trainer
    for unwanted in (PrinterCallback, HFProgressCallback):
        trainer.remove_callback(unwanted)
    if context.rank_info is not None:
        from posttrain.distributed.trainer import prepare_trainer

        prepare_trainer(trainer, spec, context.rank_info, placement.device)
    if stop.is_set():
        result.state = stop.outcome
        return result

    checkpoint = starting_point(jd, context.resume, wait_for_ranks=barrier) if context.resume else None
    if checkpoint is not None and context.rank_info is None:
        from posttrain.distributed.checkpoint import is_distributed_checkpoint, use_distributed_checkpoints

        if is_distributed_checkpoint(checkpoint):  # a torchrun run's checkpoint, resumed on one process
            use_distributed_checkpoints(trainer)
    output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)

    result.step = trainer.state.global_step
    result.total_steps = trainer.state.max_steps
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result.final_loss = losses[-1] if losses else output.training_loss
    result.tokens_per_s = metrics_cb.tokens_per_s
    result.metrics = dict(output.metrics)
    finished = result.total_steps is not None and result.step >= result.total_steps
    if evaluator is not None and evaluator.divergence is not None:
        record_status(jd, step=result.step, total_steps=result.total_steps)
        result.state, result.error = "failed", f"stopped by eval.stop_on_divergence: {evaluator.divergence}"
        return result
    if stop.is_set() and not (stop.pausing and finished):  # a pause on the last step just finishes
        result.state, result.cancelled_by = stop.outcome, stop.signal_name
        return result
    if spec.output.save_final:
        result.final_dir = save_final(trainer.save_model, tokenizer, jd)
    record_status(jd, step=result.step, total_steps=result.total_steps)
    result.state = "succeeded"
    return result


def trainer_held_out(spec: JobSpec, data: PreparedData) -> Any:
    """The rows the trainer's own evaluation loop scores (sft, dpo, reward: TRL's teacher-forced metrics),
    eval.max_samples of them; None where it has none: GRPO (its held-out scores are the Evaluator's), or
    eval.data rows the method cannot score (prompt/answer rows for SFT: they are graded, not scored)."""
    if spec.method.name not in TRAINER_METRICS:
        return None
    held_out = data.eval
    if spec.eval.data is not None:
        try:
            held_out = load_held_out(spec.data, spec.eval.data, spec.eval.split, spec.method.name)
        except DatasetError as exc:
            log.info("eval: %s rows are graded only, not scored by the %s trainer (%s)", spec.eval.data,
                     spec.method.name, exc.message)
            return None
    if held_out is None:
        return None
    return held_out.select(sample_indices(len(held_out), spec.eval.max_samples, spec.training.seed))
