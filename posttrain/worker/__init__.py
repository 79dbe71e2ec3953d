"""The worker: runs one job in this process and records it in its job directory.

    python -m posttrain.worker --spec spec.json --job-dir DIR [--resume] [--no-log-file]

:func:`run_worker` is the whole lifecycle (job directory, logging, signals, status, the result); which code
trains is looked up in :mod:`~posttrain.worker.registry` by ``method.name``. The contract it keeps (the
job directory, signals, exit codes) is :mod:`posttrain.job`.
"""

from posttrain.worker.run import run_worker

__all__ = ["run_worker"]
