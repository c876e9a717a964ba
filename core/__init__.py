"""What the API and the workers share, torch-free: settings, the Redis job store, the queue, the
owner-aware reference resolver, files on the storage volumes and the webhook outbox.

Imports flow `app -> core`, `workers -> core`; core imports only the torch-free ground floor,
common/, never models/. See docs/architecture.md#2-dependency-rules.
"""
