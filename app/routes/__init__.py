"""The API's routes, one router per resource. `create_app` includes `ROUTERS` in this order; the
dashboard (optional, static files) is mounted after them.

A new endpoint goes into the router of its resource, or a new module here added to `ROUTERS`
(docs/architecture.md#an-endpoint).
"""

from spkd.app.routes import artifacts, datasets, events, jobs, models, ops, predict, stages, webhooks

ROUTERS = [
    jobs.router,
    stages.router,
    events.router,
    artifacts.router,
    datasets.router,
    models.router,
    ops.router,
    webhooks.router,
    predict.router,
]
