"""The job service: REST API, durable job store, scheduler and auth around the worker.

Routes (``app.py``) stay thin; the store (``store.py``) and the scheduler (``scheduler.py``) are plain
classes. Importing this package is cheap (no FastAPI, no SQLAlchemy) so that ``posttrain.client`` can
use the response models in ``schemas.py``.
"""
