"""The API's routes, one ``APIRouter`` module per resource. Every router but ``health`` and ``dashboard``
carries the ``require_api_key`` dependency, so a route added to it cannot be public by accident; the
dashboard's routes serve only the page's own files, which hold no data."""

from posttrain.service.routes import dashboard, files, fine_tuning, health, inference, jobs

ROUTERS = (health.router, jobs.router, files.router, fine_tuning.router, inference.router, dashboard.router)
