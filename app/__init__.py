"""spkd's HTTP service: FastAPI routes, request/response schemas, auth, dataset uploads and the
dashboard's static files. The settings, the Redis job store and the files on the volumes are core/'s,
shared with the workers. Never imports torch (docs/architecture.md#2-dependency-rules): the API
image stays small and starts fast.
"""
