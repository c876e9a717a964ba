"""Derive a local variant of docker-compose.yml: host networking, no GPU, prebuilt images.

For machines where containers cannot have their own network (docker/smoke.sh here) or have no
GPU. Everything binds to 127.0.0.1 on the given ports, so it can run beside a Redis or an API
already listening on the defaults.

    python docker/local_compose.py --env-file /abs/spkd.env > /tmp/compose.local.yml
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def localize(
    compose: dict[str, Any],
    *,
    env_file: str,
    redis_port: int = 6391,
    api_port: int = 8391,
    tag: str = "latest",
    redis_image: str = "spkd-redis:local",
) -> dict[str, Any]:
    """The compose model with host networking, no published ports, no GPU reservation, no builds."""
    out = copy.deepcopy({k: v for k, v in compose.items() if not k.startswith("x-")})
    # Optional profiles (flower) need images the smoke test does not build.
    services = {n: s for n, s in out["services"].items() if not s.get("profiles")}
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    for name, svc in services.items():
        svc["network_mode"] = "host"
        for key in ("ports", "deploy", "build"):
            svc.pop(key, None)
        if "env_file" in svc:
            svc["env_file"] = [env_file]
        if name == "redis":
            svc["image"] = redis_image
            svc["command"] = svc["command"].replace("--port 6379", f"--port {redis_port} --bind 127.0.0.1")
            svc["healthcheck"]["test"] = [
                t.replace("-p 6379", f"-p {redis_port}") for t in svc["healthcheck"]["test"]
            ]
            continue
        svc["image"] = svc["image"].rsplit(":", 1)[0] + f":{tag}"
        env = svc.setdefault("environment", {})
        env["SPKD_REDIS_URL"] = redis_url
        if name == "api":
            env["SPKD_HOST"] = "127.0.0.1"
            env["SPKD_PORT"] = str(api_port)
    out["services"] = services
    return out


def load(path: Path = ROOT / "docker-compose.yml") -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env-file", required=True, help="absolute path of the env file with SPKD_API_KEYS")
    ap.add_argument("--redis-port", type=int, default=6391)
    ap.add_argument("--api-port", type=int, default=8391)
    ap.add_argument("--tag", default="latest", help="tag of the spkd-api / spkd-worker images")
    ap.add_argument("--redis-image", default="spkd-redis:local")
    ap.add_argument("--compose", type=Path, default=ROOT / "docker-compose.yml")
    args = ap.parse_args(argv)
    model = localize(
        load(args.compose),
        env_file=args.env_file,
        redis_port=args.redis_port,
        api_port=args.api_port,
        tag=args.tag,
        redis_image=args.redis_image,
    )
    yaml.safe_dump(model, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
