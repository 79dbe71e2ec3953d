"""The Kubeflow pipeline of one JobSpec: prepare-data -> train -> export, and its IR YAML.

    pipeline = build_pipeline(spec)                 # a kfp GraphComponent
    compile_pipeline(spec, "pipeline.yaml")         # IR YAML for any KFP host

The spec travels as the ``spec_json`` pipeline parameter (its default is the spec the pipeline was built
from); data flows as a ``Dataset`` artifact and the trained adapter or model as a ``Model`` artifact.
``distributed.kfp`` decides the containers: ``base_image``, ``packages_to_install``, and GPU requests on
the train step (``use_gpu`` or the USE_GPU variable: ``nvidia.com/gpu`` = ``gpu_count``).

No ``from __future__ import annotations`` here: KFP reads the pipeline function's annotations as types.
"""

import os
import re
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.spec import JobSpec

GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_BASE_IMAGE = "python:3.11"  # posttrain needs 3.11; the image must also hold posttrain (see docs)
STEP_NAMES = ("prepare-data", "train", "export")


def require_kfp() -> None:
    try:
        import kfp  # noqa: F401
    except ImportError:
        raise PosttrainError("kfp is not installed: pip install 'posttrain[kfp]' (kfp>=2.17,<2.18)") from None


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def uses_gpu(spec: JobSpec) -> bool:
    """The seed's rule: the ``use_gpu`` key, or the USE_GPU variable of whoever builds the pipeline."""
    return spec.distributed.kfp.use_gpu or env_flag("USE_GPU")


def pipeline_name(spec: JobSpec) -> str:
    """A KFP pipeline name (lowercase letters, digits, dashes) from the job's name."""
    stem = re.sub(r"[^a-z0-9]+", "-", (spec.name or spec.method.name).lower()).strip("-")
    return f"posttrain-{stem or spec.method.name}"[:100]


def _component_options(spec: JobSpec, local: bool) -> dict[str, Any]:
    """A local run uses this environment (kfp.local with use_venv=False): installing anything would need a
    package index and change the environment running it, so local steps install nothing."""
    options = spec.distributed.kfp
    if local:
        return {"base_image": options.base_image or DEFAULT_BASE_IMAGE, "install_kfp_package": False}
    return {"base_image": options.base_image or DEFAULT_BASE_IMAGE,
            "packages_to_install": list(options.packages_to_install) or None}


def build_pipeline(spec: JobSpec, *, local: bool = False, uploaded_data_uri: str | None = None) -> Any:
    """The pipeline (a ``kfp.dsl`` GraphComponent) for ``spec``.

    ``local``: built for kfp.local in this environment (no pip installs). ``uploaded_data_uri``: where a
    remote run's local data files were uploaded (an S3 folder); the pipeline imports it as a Dataset.
    """
    require_kfp()
    from kfp import dsl

    from posttrain.kfp import components

    options = _component_options(spec, local)
    prepare = dsl.component(components.prepare_data, **options)
    prepare_uploaded = dsl.component(components.prepare_uploaded_data, **options)
    train = dsl.component(components.train, **options)
    export = dsl.component(components.export, **options)
    gpu = uses_gpu(spec)
    # One line: KFP copies parameter defaults into the IR file's header comment, where a newline breaks the YAML.
    spec_json = spec.model_dump_json()
    gpu_count = spec.distributed.kfp.gpu_count

    @dsl.pipeline(name=pipeline_name(spec), description=f"posttrain {spec.method.name} on {spec.model.name_or_path}: "
                  "prepare data, train, export the model")
    def posttrain_pipeline(spec_json: str = spec_json, job_dir: str = "", resume: bool = False,
                           log_file: bool = True) -> dsl.Model:
        if uploaded_data_uri is not None:
            imported = dsl.importer(artifact_uri=uploaded_data_uri, artifact_class=dsl.Dataset, reimport=False)
            imported.set_display_name("uploaded-data")
            data = prepare_uploaded(spec_json=spec_json, uploaded=imported.output, job_dir=job_dir)
        else:
            data = prepare(spec_json=spec_json, job_dir=job_dir)
        data.set_display_name("prepare-data")
        trained = train(spec_json=spec_json, dataset=data.outputs["dataset"], job_dir=job_dir, resume=resume,
                        log_file=log_file)
        trained.set_display_name("train")
        if gpu:
            trained.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpu_count)
            trained.set_env_variable("USE_GPU", "true")
        exported = export(job=trained.outputs["job"], job_dir=job_dir)
        exported.set_display_name("export")
        for task in (data, trained, exported, *([imported] if uploaded_data_uri is not None else [])):
            task.set_caching_options(False)  # a training run is never a cache hit of an earlier one
        return exported.outputs["model"]

    return posttrain_pipeline


def compile_pipeline(spec: JobSpec, path: str | Path, *, uploaded_data_uri: str | None = None) -> Path:
    """Write the pipeline's IR YAML to ``path``."""
    from kfp import compiler

    pipeline = build_pipeline(spec, uploaded_data_uri=uploaded_data_uri)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_func=pipeline, package_path=str(path))
    return path


def image_warning(spec: JobSpec) -> str | None:
    """A cluster step runs in a fresh container: without posttrain in its image or packages it cannot start."""
    options = spec.distributed.kfp
    if options.base_image is None and not any("posttrain" in package for package in options.packages_to_install):
        return ("the components' image is the plain python:3.11 and packages_to_install does not name posttrain: "
                "set distributed.kfp.base_image to an image with posttrain, or add posttrain to "
                "distributed.kfp.packages_to_install, before running this pipeline on a cluster")
    return None
