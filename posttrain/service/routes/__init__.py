"""The API's routes, one ``APIRouter`` module per resource. Every router but ``health`` carries the
``require_api_key`` dependency, so a route added to it cannot be public by accident."""

from posttrain.service.routes import files, fine_tuning, health, jobs

ROUTERS = (health.router, jobs.router, files.router, fine_tuning.router)
