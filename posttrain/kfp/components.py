"""The pipeline's component functions, as KFP packages them.

KFP ships each function's source (not this module) to the step's container and calls it there, so each
one imports what it uses inside its body and does nothing but unpack artifacts and call
:mod:`posttrain.kfp.steps`. The step's image must have posttrain installed (``base_image`` or
``packages_to_install``). No ``from __future__ import annotations`` here: KFP reads the annotations.

``job_dir``: when the pipeline runs on this machine for a posttrain job directory (``posttrain kfp run
--local``, a service job), the train step writes that directory itself (status, metrics, final/) and the
``job`` artifact is a link to it; on a cluster it is empty and the job directory is the artifact.
"""

from kfp.dsl import Artifact, Dataset, Input, Model, Output


def prepare_data(spec_json: str, dataset: Output[Dataset], job_dir: str = ""):
    """Read and check the JobSpec's training (and validation) data; the rows become the Dataset."""
    from posttrain.kfp.steps import prepare_dataset

    dataset.metadata.update(prepare_dataset(spec_json, dataset.path, job_dir=job_dir))


def prepare_uploaded_data(spec_json: str, uploaded: Input[Dataset], dataset: Output[Dataset], job_dir: str = ""):
    """prepare_data for a remote run whose local data files were uploaded to S3 (imported as ``uploaded``)."""
    from posttrain.kfp.steps import prepare_dataset

    dataset.metadata.update(prepare_dataset(spec_json, dataset.path, uploaded_dir=uploaded.path, job_dir=job_dir))


def train(spec_json: str, dataset: Input[Dataset], job: Output[Artifact], job_dir: str = "",
          resume: bool = False, log_file: bool = True):
    """Run posttrain's worker on the Dataset; the job directory (status, metrics, final/) is ``job``."""
    import os
    import sys

    from posttrain.kfp.steps import train_job

    target = job_dir or job.path
    if job_dir:
        os.makedirs(job_dir, exist_ok=True)
        if not os.path.lexists(job.path):
            os.symlink(os.path.abspath(job_dir), job.path)
    job.metadata["job_dir"] = os.path.abspath(target)
    code = train_job(spec_json, dataset.path, target, resume=resume, log_file=log_file)
    if code != 0:
        sys.exit(code)  # the worker's own exit code: failed, rejected input, cancelled or paused


def export(job: Input[Artifact], model: Output[Model], job_dir: str = ""):
    """Check that the trained final/ loads and make it the Model artifact (adapter or full model)."""
    from posttrain.kfp.steps import export_model

    model.metadata.update(export_model(job.path, model.path, record_in=job_dir))
