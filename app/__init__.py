"""spkd's HTTP service: FastAPI routes, schemas, auth, settings and the Redis job store.

Never imports torch (docs/architecture.md, Dependency rules): the API image stays small and starts fast.
"""
