"""spkd's HTTP service: FastAPI routes, schemas, auth, settings and the Redis job store.

Never imports torch (DESIGN.md section 2): the API image stays small and starts fast.
"""
