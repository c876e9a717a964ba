"""The one owner-aware resolver for every file a job spec names. Torch-free.

A spec reaches files in four ways: `dataset.path` (a folder under SPKD_DATA_ROOT), `dataset.id`
(an upload), a weights path (a file under SPKD_WEIGHTS_ROOTS, relative or absolute) and
`weights: job:<id>` (an earlier job's artifact). The API calls these functions at POST /v1/jobs
and the worker calls them again at run time (files can change in between), so both decide alike.

The rule: a spec reaches only the caller's own uploads (by `dataset.id`), the caller's own
artifacts (by `job:<id>`) and the admin's read-only roots (the data root outside its uploads area,
the weight roots). The uploads area and the artifact root are never reachable by a raw path, even
when a weight root or the data root contains them. Paths are resolved (symlinks, `..`) before the
check, and compared by file identity as well as by name, so another name for the same folder (a
case-insensitive filesystem, a bind mount) is caught too. Another key's upload or job answers
exactly like one that does not exist: the same code, message shape and field.

What a dataset source must be (an upload, a `dataset.hf` folder, a torchvision split...) is
checked by its module in core/sources/ (`resolve_spec` calls `sources.locate`), on the area rules
kept here (`resolve_dataset_path`). The worker's scan (common/scan.py) judges the images themselves.

Every refusal is a `common.errors.SpkdError(code, message, field)`; the API turns it into a 422.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis

from spkd.common import artifacts
from spkd.common.errors import SpkdError
from spkd.common.spec import WEIGHT_KEYWORDS, JobSpec
from spkd.core import attempts, sources, store
from spkd.core.settings import Settings

# A role's weights in a job's hub folders; a job in the old layout: common/artifacts.py.
ROLE_FILES = {role: artifacts.weights_name(role) for role in artifacts.MODEL_ROLES}
UPLOADS_DIRNAME = "datasets"


# ---------------------------------------------------------------- the areas


def uploads_dir(settings: Settings) -> Path:
    """Where uploads live (`<data root>/datasets`, one folder per dataset id), resolved."""
    return (Path(settings.data_root).resolve() / UPLOADS_DIRNAME).resolve()


def datasets_dir(settings: Settings) -> Path:
    """The uploads area, created on first use (raw dataset paths are kept out of it, see
    `resolve_dataset_path`)."""
    d = uploads_dir(settings)
    d.mkdir(parents=True, exist_ok=True)
    return d


def artifact_dir(settings: Settings) -> Path:
    """The artifact root (`<root>/<job id>/`), resolved."""
    return Path(settings.artifact_root).resolve()


def private_areas(settings: Settings) -> list[Path]:
    """Folders that hold per-key files: reachable only through dataset.id and job:<id>."""
    return [uploads_dir(settings), artifact_dir(settings)]


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _chain(path: Path) -> list[Path]:
    return [path, *path.parents]


def overlaps_private(path: Path, settings: Settings) -> bool:
    """True when the resolved `path` lies inside a private area or contains one (e.g. the data
    root itself, which holds the uploads area). By name and by file identity."""
    mine = {i for i in (_identity(p) for p in _chain(path)) if i is not None}
    own = _identity(path)
    for area in private_areas(settings):
        if path.is_relative_to(area) or area.is_relative_to(path):
            return True
        if _identity(area) in mine:  # inside it under another name
            return True
        if own is not None and own in {_identity(p) for p in _chain(area)}:  # contains it
            return True
    return False


def _resolve(base: Path, raw: str) -> Path | None:
    """`raw` resolved against `base` (absolute `raw` as is), symlinks and `..` followed; None for
    a path the OS cannot name (NUL byte, too long)."""
    if "\x00" in raw or not raw.strip():
        return None
    p = Path(raw)
    try:
        return (p if p.is_absolute() else base / p).resolve()
    except (OSError, ValueError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return None


# ---------------------------------------------------------------- datasets


def _path_refused(raw: str) -> SpkdError:
    # One message for every refused path, whatever is (or is not) behind it: no probing.
    return SpkdError(
        "dataset_path_not_allowed",
        f"dataset.path {raw!r} must name a folder under the server's data root, outside its "
        "uploads area (an uploaded dataset is named by dataset.id); a symlink counts where it "
        "points, so the operator links or mounts data under the root, not out of it",
        "dataset.path",
    )


def _links_stay_out(folder: Path, settings: Settings) -> bool:
    """The engine follows symlinked split and class folders (depth 1 and 2) while scanning (deeper
    ones and symlinked files it skips); each such link must stay in the data root and out of the
    private areas. scandir: no stat per image file."""
    root = Path(settings.data_root).resolve()
    links: list[Path] = []
    try:
        with os.scandir(folder) as top:
            for entry in top:
                if entry.is_symlink():
                    links.append(Path(entry.path))
                elif entry.is_dir():
                    with os.scandir(entry.path) as inner:
                        links += [Path(e.path) for e in inner if e.is_symlink()]
    except OSError:
        return True  # unreadable: the engine's scan reports it
    for link in links:
        try:
            target = link.resolve()
        except (OSError, RuntimeError):  # a symlink loop: the engine cannot use it either
            continue
        if target.is_dir() and (not target.is_relative_to(root) or overlaps_private(target, settings)):
            return False
    return True


def resolve_dataset_path(settings: Settings, raw: str) -> Path:
    """`dataset.path` -> the resolved folder under the data root. Raises SpkdError
    `dataset_path_not_allowed` (outside the data root, inside or above the uploads area or the
    artifact root, a symlink to any of those) or `dataset_not_found` (no such folder)."""
    root = Path(settings.data_root).resolve()
    full = _resolve(root, raw)
    if full is None or not full.is_relative_to(root) or overlaps_private(full, settings):
        raise _path_refused(raw)
    if not full.is_dir():
        raise SpkdError(
            "dataset_not_found", f"no folder {raw!r} under the server's data root", "dataset.path"
        )
    if not _links_stay_out(full, settings):
        raise _path_refused(raw)
    return full


# ---------------------------------------------------------------- weights


def _weights_refused(raw: str, field: str) -> SpkdError:
    return SpkdError(
        "weights_not_allowed",
        f"weight file {raw!r} is not a file under the server's weight folders (SPKD_WEIGHTS_ROOTS); "
        "an earlier job's weights are named job:<job id>",
        field,
    )


def weight_roots(settings: Settings) -> list[Path]:
    """The admin's weight folders (SPKD_WEIGHTS_ROOTS), resolved. The artifact root is not one:
    artifacts are reached through job:<id> only."""
    return [Path(p).resolve() for p in settings.weights_root_list()]


def resolve_weight_file(settings: Settings, raw: str, field: str) -> Path:
    """A weights path -> the resolved file inside a weight root and outside every private area.
    Relative paths are tried against each root in order. Raises SpkdError `weights_not_allowed`
    (the same for missing, escaping, private and not-a-file)."""
    for root in weight_roots(settings):
        full = _resolve(root, raw)
        if full is None or not full.is_relative_to(root) or overlaps_private(full, settings):
            continue
        if full.is_file():
            return full
    raise _weights_refused(raw, field)


def is_public_weight_file(settings: Settings, path: Path) -> bool:
    """True for a file `weights: <path>` may name (used to list them at GET /v1/models)."""
    full = path.resolve()
    roots = weight_roots(settings)
    return (
        full.is_file() and any(full.is_relative_to(r) for r in roots) and not overlaps_private(full, settings)
    )


def resolve_job_weights(
    r: redis.Redis,
    keys: store.Keys,
    settings: Settings,
    role: str,
    model: str,
    job_id: str,
    owner: str,
    require_finished: bool = True,
) -> Path | None:
    """`job:<id>` -> that job's fine-tuned file of the same model (the same role first): its hub
    folder's `<role>/model.safetensors`, or `<role>.safetensors` of a job in the old layout
    (common/artifacts.py).

    Only the owner's jobs: another key's job (in any status) answers like a missing one,
    `weights_job_not_found`. `weights_job_not_finished` for the owner's unfinished job (at submit,
    `require_finished=False` accepts a still active one and returns None: it may finish before
    this job runs), `weights_mismatch` when neither of its models is `model`."""
    field = f"{role}.weights"
    other = store.get_job(r, keys, job_id, owner)
    if other is None:
        raise SpkdError("weights_job_not_found", f"no job {job_id!r} for this API key", field)
    status = other["status"]
    order = [role] + [x for x in ROLE_FILES if x != role]
    candidates = [c for c in order if (other["spec"].get(c) or {}).get("model") == model]
    if not candidates:
        raise SpkdError(
            "weights_mismatch",
            f"job {job_id!r} has no fine-tuned {model!r} (its teacher and student are other models)",
            field,
        )
    if status != store.SUCCEEDED:
        if not require_finished and status in store.ACTIVE:
            return None
        raise SpkdError("weights_job_not_finished", f"job {job_id!r} is {status}, not succeeded", field)
    # The attempt folder the record names (core/attempts.py), or the job folder of an older job.
    job_dir = attempts.output_dir(artifact_dir(settings) / job_id, other.get("output"))
    for name in (n for c in candidates for n in artifacts.role_weights_names(c)):  # hub folder, then flat
        path = job_dir / name
        if settings.storage_url:  # in the bucket (core/bucket.py): registered is enough here,
            if store.get_artifact(r, keys, job_id, name) is not None:
                return path  # the worker fetches it to this path (workers/runner.py)
            continue
        try:
            real = path.resolve()
        except (OSError, RuntimeError):
            continue
        if real == path and real.is_file():  # its own file, no symlink out of the job's folder
            return real
    raise SpkdError("weights_job_not_found", f"job {job_id!r} has no {model!r} weights file left", field)


def resolve_weights(
    r: redis.Redis,
    keys: store.Keys,
    settings: Settings,
    spec: JobSpec,
    owner: str,
    require_finished: bool = True,
) -> JobSpec:
    """Check both `weights` references; returns the spec with each file reference replaced by its
    checked absolute path (the engine sees only paths). Raises SpkdError (see above)."""
    updates: dict[str, Any] = {}
    for role in ROLE_FILES:
        part = getattr(spec, role)
        w = part.weights
        if w in WEIGHT_KEYWORDS:
            continue
        if w.startswith("job:"):
            path = resolve_job_weights(r, keys, settings, role, part.model, w[4:], owner, require_finished)
        else:
            path = resolve_weight_file(settings, w, f"{role}.weights")
        if path is not None:
            updates[role] = part.model_copy(update={"weights": str(path)})
    return spec.model_copy(update=updates) if updates else spec


# ---------------------------------------------------------------- MLflow servers
def _origin(uri: str) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, path without trailing '/') of an http(s) URL; None when it is not one.
    User info is no part of it: the allowed list may carry credentials, a job's URI never does."""
    try:
        parts = urlsplit(uri.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    if _climbs(parts.path):
        return None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80), parts.path.rstrip("/")


def _climbs(path: str) -> bool:
    """True when the path has a dot segment ('.' or '..', RFC 3986 §5.2.4), percent-encoded or with a
    ';' parameter: the server or a proxy resolves it, so the prefix check would pass a path that
    leaves the allowed one (`/mlflow/../admin`)."""
    return any(seg.split(";")[0] in (".", "..") for seg in unquote(path).split("/"))


def tracking_uri_allowed(settings: Settings, uri: str) -> bool:
    """True when `uri` is on one of the allowed MLflow servers: same scheme, host and port as an
    entry of Settings.mlflow_allowed_uri_list(), and its path that entry's path or below it."""
    want = _origin(uri)
    if want is None:
        return False
    for allowed in map(_origin, settings.mlflow_allowed_uri_list()):
        if allowed is None or want[:3] != allowed[:3]:
            continue
        if want[3] == allowed[3] or want[3].startswith(allowed[3] + "/"):
            return True
    return False


def check_integrations(settings: Settings, spec: JobSpec) -> None:
    """Refuse an `mlflow` integration whose tracking_uri the operator did not allow.

    The worker sends its MLflow credentials (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN) to whatever
    server a run logs to, from inside the operator's network: a tenant's URI could collect them or
    probe internal hosts. Raises SpkdError `tracking_uri_not_allowed` naming the field and the
    allowed servers (without credentials)."""
    for i, entry in enumerate(getattr(spec, "integrations", None) or []):
        uri = getattr(entry, "tracking_uri", None)
        if entry.type != "mlflow" or not uri or tracking_uri_allowed(settings, uri):
            continue
        listed = [_without_credentials(u) for u in settings.mlflow_allowed_uri_list()]
        where = f"the allowed ones are {', '.join(listed)}" if listed else "this server allows none"
        raise SpkdError(
            "tracking_uri_not_allowed",
            f"tracking_uri {uri!r} is not an MLflow server this service logs to ({where}); leave "
            "tracking_uri out to use the server's default, or ask the operator to add the server to "
            "SPKD_MLFLOW_ALLOWED_URIS",
            f"integrations.{i}.tracking_uri",
        )


def _without_credentials(uri: str) -> str:
    try:
        parts = urlsplit(uri)
        netloc = parts.hostname or ""
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
    except ValueError:
        return "<unparseable uri>"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def resolve_spec(
    r: redis.Redis,
    keys: store.Keys,
    settings: Settings,
    spec: JobSpec,
    owner: str,
    require_finished: bool = True,
) -> tuple[Path | None, JobSpec]:
    """Every reference of a spec: (dataset folder, or None for one the worker builds: core/sources/;
    spec with resolved weight paths). The MLflow servers it names are checked too
    (check_integrations). Raises SpkdError."""
    check_integrations(settings, spec)
    data_dir = sources.locate(sources.Located(r, keys, settings, owner), spec.dataset)
    return data_dir, resolve_weights(r, keys, settings, spec, owner, require_finished)
