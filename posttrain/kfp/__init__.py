"""Kubeflow Pipelines: a JobSpec as a pipeline of three components (prepare data -> train -> export).

    steps.py       what each component runs: posttrain's own data loader, worker and job directory
    components.py  the component functions KFP packages (thin: they call steps.py)
    pipeline.py    the pipeline built from one JobSpec, and its compilation to IR YAML
    runs.py        running it: kfp.local here, or submitted to a KFP host with data in S3
    driver.py      the process a service job with distributed.launcher=kfp runs (worker-shaped arguments)
    commands.py    `posttrain kfp compile|run`

Nothing here imports kfp at package import time: kfp is an optional dependency (``pip install
posttrain[kfp]``), and the Llama Stack providers must import neither kfp nor torch.
"""
