"""spkd's Celery workers: the app and its settings (`celery_app`), the task and the worker's
lifecycle hooks (`tasks`), one job's run under a lease (`runner`), the engine's Reporter written to
the store under the attempt's fencing token (`reporter`) and the webhook sender (`webhooks`).
Imports core/, models/ and common/ (docs/architecture.md#2-dependency-rules); torch only in a job's
process.
"""
