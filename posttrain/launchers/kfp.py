"""KFP launcher: a job with ``distributed.launcher=kfp`` runs its Kubeflow pipeline (prepare data -> train
-> export) on this machine under kfp.local.

The process it starts is ``python -m posttrain.kfp.driver`` with the worker's own arguments, in its own
session and process group like a local worker, so everything the local launcher does (a minimal
environment, cancel and kill of the whole group, re-adoption after a server restart by the job directory
on the command line) applies unchanged; the pipeline's steps are children in that group. The train step
writes the job directory (status, metrics, final/) exactly as a local worker does.

Imports nothing of kfp: the driver does, under ``python`` (the workers' interpreter).
"""

from __future__ import annotations

from posttrain.launchers.local import LocalLauncher

DRIVER_MODULE = "posttrain.kfp.driver"


class KFPLauncher(LocalLauncher):
    name = "kfp"

    def __init__(self, python: str) -> None:
        super().__init__([python, "-m", DRIVER_MODULE])
