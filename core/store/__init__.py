"""The Redis job store: jobs, events, artifacts, datasets, idempotency keys, leases, heartbeats.

Torch-free and Celery-free: the API and the workers both import it. Every function takes a redis
client (decode_responses=True) and a key prefix, so tests run against the real Redis under their
own prefix. Callers use the package (`from spkd.core import store; store.transition(...)`); every name
below is re-exported here. One module per resource:

    keys.py         Keys (the layout below), job statuses, Conflict / InUse / CancelPending /
                    NotPausable, new_id, owner_of, now, connect, the job hash encoding, delete_prefix
    jobs.py         create / get / list / update / transition / cancel / pause / resume / delete,
                    the cancel and pause flags a worker polls, counts by status, which active
                    jobs' specs name a record (references_of, jobs_using, jobs_using_job)
    events.py       a job's event log: add, list, the async reads of the live streams
    artifacts.py    a job's artifact registry
    datasets.py     dataset records, and which active or paused jobs use one
    idempotency.py  Idempotency-Key bindings
    leases.py       Lease, fencing tokens (fenced, check_fence), the exists gate of late writes,
                    orphan claims
    workers.py      worker heartbeats
    metrics.py      the ops histograms (Prometheus)
    scripts.py      every Lua script the others run

Keys (P = SPKD_REDIS_PREFIX):

    P:job:<id>                 hash: the job (JSON-encoded fields where structured)
    P:jobs:<owner>             zset, all scores 0, members = job ids (time-sortable): newest first
    P:jobs:<owner>:<status>    the same, per status (status filter without scanning)
    P:status:<status>          zset of job ids per status, all owners (metrics, recovery)
    P:events:<id>              stream of events (XADD / XRANGE / XREAD BLOCK for SSE)
    P:artifacts:<id>           hash name -> {"name", "size", "sha256"}
    P:dataset:<id>             string: the dataset JSON;  P:datasets:<owner> zset like jobs
    P:idem:<owner>:<key>       string: {"body": sha256, "job_id"} with a TTL
    P:idem-of:<job id>         set of the P:idem keys naming that job (removed with the job)
    P:store_id                 string: this namespace's random id (core/storage.py folder markers)
    P:lease:<id>               string: token of the worker running the job (SET NX PX, renewed)
                               (its fencing token is the job hash's `fence` field, see Lease)
    P:workers                  zset worker name -> last heartbeat (unix seconds); P:worker:<name> info
    P:metrics:<name>           hash label|bucket -> count of one ops histogram
"""

from __future__ import annotations

from spkd.core.store.artifacts import get_artifact, list_artifacts, set_artifacts
from spkd.core.store.datasets import (
    delete_dataset,
    get_dataset,
    jobs_using_dataset,
    list_datasets,
    save_dataset,
)
from spkd.core.store.events import _event, add_event, aget_job_fields, aread_events, list_events
from spkd.core.store.idempotency import body_hash, claim_idempotency_key
from spkd.core.store.jobs import (
    bump_attempts,
    cancel_requested,
    count_by_status,
    create_job,
    delete_job,
    get_job,
    job_ids_with_status,
    jobs_using,
    jobs_using_job,
    list_jobs,
    references_of,
    request_cancel,
    request_pause,
    resume_job,
    start_attempt,
    stop_flags,
    transition,
    update_job,
)
from spkd.core.store.keys import (
    ACTIVE,
    AT_REST,
    CANCELLED,
    DATASET_USERS,
    EVENTS_MAXLEN,
    FAILED,
    FINAL,
    PAUSED,
    QUEUED,
    RUNNING,
    STATUSES,
    SUCCEEDED,
    VALIDATING,
    CancelPending,
    Conflict,
    InUse,
    Keys,
    NotPausable,
    connect,
    delete_prefix,
    new_id,
    now,
    owner_of,
)
from spkd.core.store.leases import Lease, check_fence, claim_orphan, fenced, lease_held
from spkd.core.store.metrics import DURATION_BUCKETS, MEMORY_BUCKETS, observe_finished_job, read_histogram
from spkd.core.store.workers import heartbeat, live_workers, most_devices, remove_worker

__all__ = [
    # keys.py
    "ACTIVE",
    "AT_REST",
    "CANCELLED",
    "DATASET_USERS",
    "EVENTS_MAXLEN",
    "FAILED",
    "FINAL",
    "PAUSED",
    "QUEUED",
    "RUNNING",
    "STATUSES",
    "SUCCEEDED",
    "VALIDATING",
    "CancelPending",
    "Conflict",
    "InUse",
    "Keys",
    "NotPausable",
    "connect",
    "delete_prefix",
    "new_id",
    "now",
    "owner_of",
    # jobs.py
    "bump_attempts",
    "cancel_requested",
    "count_by_status",
    "create_job",
    "delete_job",
    "get_job",
    "job_ids_with_status",
    "jobs_using",
    "jobs_using_job",
    "list_jobs",
    "references_of",
    "request_cancel",
    "request_pause",
    "resume_job",
    "start_attempt",
    "stop_flags",
    "transition",
    "update_job",
    # events.py (`_event` decodes one raw stream entry: app/live.py reads entries itself)
    "_event",
    "add_event",
    "aget_job_fields",
    "aread_events",
    "list_events",
    # artifacts.py
    "get_artifact",
    "list_artifacts",
    "set_artifacts",
    # datasets.py
    "delete_dataset",
    "get_dataset",
    "jobs_using_dataset",
    "list_datasets",
    "save_dataset",
    # idempotency.py
    "body_hash",
    "claim_idempotency_key",
    # leases.py
    "Lease",
    "check_fence",
    "claim_orphan",
    "fenced",
    "lease_held",
    # workers.py
    "heartbeat",
    "live_workers",
    "most_devices",
    "remove_worker",
    # metrics.py
    "DURATION_BUCKETS",
    "MEMORY_BUCKETS",
    "observe_finished_job",
    "read_histogram",
]
