"""The job contract: what every door, launcher, worker and trainer agrees on about one run.

- :mod:`~posttrain.job.directory`: the job directory (spec.json, status.json, metrics.jsonl, checkpoints
  with their completion marker and their names, final/), written atomically.
- :mod:`~posttrain.job.result`: :class:`JobResult` and the process exit code of each end state.
- :mod:`~posttrain.job.signals`: which signal cancels and which pauses, and the :class:`StopRequest` they set.
- :mod:`~posttrain.job.ranks`: which process of a distributed run writes the job directory.
- :mod:`~posttrain.job.final`: saving ``final/`` atomically.
- :mod:`~posttrain.job.resume`: where a run starts (fresh, or the newest complete checkpoint).
- :mod:`~posttrain.job.context`: :class:`RunContext`, what the worker hands a method's ``run``.

Nothing here imports torch or any training library: every layer above may use it.
"""
