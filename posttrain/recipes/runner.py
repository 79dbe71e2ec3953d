"""The run of every TRL method (sft, dpo, reward, grpo): data -> trainer -> train -> final/.

Read top to bottom: load and check the data, build the method's trainer (``recipes.<method>``) with the
callbacks that keep the job directory current, prepare it for torchrun (DDP/FSDP2), continue from the newest
complete checkpoint when resuming, train, save ``final/``.
"""

from __future__ import annotations

import logging

from posttrain.job.context import RunContext
from posttrain.job.final import save_final
from posttrain.job.ranks import record_status
from posttrain.job.result import JobResult
from posttrain.job.resume import starting_point

log = logging.getLogger("posttrain.worker")


def run(context: RunContext) -> JobResult:
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as HFProgressCallback

    from posttrain.data import load_training_data
    from posttrain.distributed.runtime import barrier
    from posttrain.modeling import load_tokenizer
    from posttrain.recipes import RecipeInputs, build_trainer
    from posttrain.recipes.callbacks import JobDirCallback, ProgressCallback
    from posttrain.recipes.common import compile_decoder_layers, record_settings, use_compile

    spec, jd, stop, result, placement = context.spec, context.job_dir, context.stop, context.result, context.placement
    data = load_training_data(spec.data, spec.method.name, seed=spec.training.seed)
    if data.skipped:
        log.warning("skipped %d malformed rows of %s (data.on_bad_row=skip)", data.skipped, data.source)
    log.info("data: %d training rows (%s format)%s", len(data.train), data.format,
             f", {len(data.eval)} validation rows" if data.eval is not None else "")
    tokenizer = load_tokenizer(spec)
    metrics_cb = JobDirCallback(jd, stop, {"num_threads": context.threads,
                                           "dtype": str(placement.dtype).removeprefix("torch.")})
    callbacks = [metrics_cb, ProgressCallback(metrics_cb, f"{spec.method.name}"), *context.extra_callbacks]
    inputs = RecipeInputs(spec, jd, placement, data, tokenizer, callbacks)
    trainer = build_trainer(inputs)
    num_params = sum(p.numel() for p in trainer.model.parameters())
    # GRPO samples from its training model unless its rollouts go through the engine (TRL's rollout_func).
    samples = spec.method.name == "grpo" and getattr(trainer, "rollout_func", None) is None
    compiled = compile_decoder_layers(trainer.model) if use_compile(spec, placement, num_params, samples) else 0
    record_settings(inputs, compiled_layers=compiled)
    if compiled:
        log.info("compiled %d decoder layers (training.compile=%s)", compiled, spec.training.compile)
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
    if stop.is_set() and not (stop.pausing and finished):  # a pause on the last step just finishes
        result.state, result.cancelled_by = stop.outcome, stop.signal_name
        return result
    if spec.output.save_final:
        result.final_dir = save_final(trainer.save_model, tokenizer, jd)
    record_status(jd, step=result.step, total_steps=result.total_steps)
    result.state = "succeeded"
    return result
