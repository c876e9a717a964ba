"""docker-compose.yml and its CPU override: the services, volumes and checks an operator relies on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that accepts Compose v2's merge tags (!reset, !override)."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return {"__tag__": node.tag, "value": loader.construct_mapping(node, deep=True)}
    if isinstance(node, yaml.SequenceNode):
        return {"__tag__": node.tag, "value": loader.construct_sequence(node, deep=True)}
    return {"__tag__": node.tag, "value": loader.construct_scalar(node)}


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, _tagged)


def load(name: str) -> dict[str, Any]:
    return yaml.load((ROOT / name).read_text(), Loader=_ComposeLoader)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load("docker-compose.yml")


def test_services(compose):
    assert {"redis", "api", "worker", "flower"} <= set(compose["services"])


def test_redis_is_durable_and_checked(compose):
    redis = compose["services"]["redis"]
    cmd = redis["command"] if isinstance(redis["command"], str) else " ".join(redis["command"])
    assert "--appendonly yes" in cmd
    assert "--maxmemory-policy noeviction" in cmd
    assert any(v.endswith(":/data") and v.split(":")[0] in compose["volumes"] for v in redis["volumes"])
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])


def test_api_port_and_redis_dependency(compose):
    api = compose["services"]["api"]
    assert any(str(p).endswith(":8000") for p in api["ports"])
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["healthcheck"]["test"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile.api"


def test_worker_reserves_an_nvidia_gpu(compose):
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia"
    assert devices[0]["capabilities"] == ["gpu"]
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["healthcheck"]["test"]
    assert worker["build"]["dockerfile"] == "docker/Dockerfile.worker"


def test_api_and_worker_share_datasets_and_artifacts(compose):
    services = compose["services"]

    def mounts(name: str) -> dict[str, str]:
        return dict(v.split(":")[:2][::-1] for v in services[name]["volumes"])

    api, worker = mounts("api"), mounts("worker")
    for target in ("/data/datasets", "/data/artifacts"):
        assert api[target] == worker[target]
        assert api[target] in compose["volumes"]
    assert worker["/cache"] in compose["volumes"]  # hub weights survive a worker restart
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["SPKD_DATA_ROOT"] == "/data/datasets"
        assert env["SPKD_ARTIFACT_ROOT"] == "/data/artifacts"
        assert env["SPKD_REDIS_URL"].startswith("redis://redis:6379")


def test_api_keys_come_from_an_env_file(compose):
    for name in ("api", "worker"):
        assert compose["services"][name]["env_file"] == ["spkd.env"]
    example = (ROOT / "spkd.env.example").read_text()
    assert "SPKD_API_KEYS=" in example
    assert "/spkd.env" in (ROOT / ".gitignore").read_text().splitlines()


def test_flower_is_an_optional_profile(compose):
    flower = compose["services"]["flower"]
    assert flower["profiles"] == ["flower"]
    assert flower["build"]["args"]["SPKD_EXTRAS"] == "flower"


def test_a_multi_gpu_worker_is_an_optional_profile(compose):
    group = compose["services"]["worker-gpus"]
    assert group["profiles"] == ["multi-gpu"] and group["image"] == compose["services"]["worker"]["image"]
    assert group["command"] == ["worker", "--gpus", "0,1,2,3"]
    (devices,) = group["deploy"]["resources"]["reservations"]["devices"]
    assert devices["device_ids"] == ["0", "1", "2", "3"]


def test_cpu_override_drops_the_gpu_reservation():
    cpu = load("docker-compose.cpu.yml")
    assert cpu["services"]["worker"]["deploy"]["__tag__"] == "!reset"


def test_local_variant_for_the_smoke_test(compose):
    """docker/local_compose.py: host network, loopback ports, no GPU, no flower, same volumes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("local_compose", ROOT / "docker" / "local_compose.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    local = mod.localize(mod.load(), env_file="/abs/spkd.env", redis_port=6391, api_port=8391, tag="smoke")

    assert set(local["services"]) == {"redis", "api", "worker"}
    assert local["volumes"].keys() == compose["volumes"].keys()
    for svc in local["services"].values():
        assert svc["network_mode"] == "host"
        assert "ports" not in svc and "deploy" not in svc and "build" not in svc
    assert "--port 6391 --bind 127.0.0.1" in local["services"]["redis"]["command"]
    assert "-p 6391" in " ".join(local["services"]["redis"]["healthcheck"]["test"])
    assert local["services"]["api"]["environment"]["SPKD_PORT"] == "8391"
    assert local["services"]["worker"]["environment"]["SPKD_REDIS_URL"] == "redis://127.0.0.1:6391/0"
    assert local["services"]["worker"]["image"] == "spkd-worker:smoke"
    assert local["services"]["api"]["env_file"] == ["/abs/spkd.env"]
    # The real file is untouched: the GPU reservation is still there.
    assert compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]


def test_s3_override_shares_only_redis_and_the_bucket(compose):
    """docker-compose.s3.yml: a SeaweedFS S3 service; API and worker name the bucket, reach it
    by service name, sign downloads for a public address, and mount no volume in common."""
    s3 = load("docker-compose.s3.yml")
    services = s3["services"]
    weed = services["seaweedfs"]
    assert weed["image"].startswith("chrislusf/seaweedfs")
    assert "-master.telemetry=false" in weed["command"] and "-s3.port=8333" in weed["command"]
    assert weed["healthcheck"]["test"] and any(str(p).endswith(":8333") for p in weed["ports"])
    config = s3["configs"][weed["configs"][0]["source"]]["content"]
    assert "${SPKD_S3_SECRET_ACCESS_KEY:?" in config  # the identity comes from the operator's env file
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["SPKD_STORAGE_URL"].startswith("s3://")
        assert env["SPKD_S3_ENDPOINT_URL"] == "http://seaweedfs:8333"
        assert services[name]["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
        assert services[name]["volumes"]["__tag__"] == "!override"
    api = {v.split(":")[0] for v in services["api"]["volumes"]["value"]}
    worker = {v.split(":")[0] for v in services["worker"]["volumes"]["value"]}
    assert api & worker == set() and "weights-cache" in worker
    assert (api | worker | {"seaweedfs-data"}) - {"weights-cache"} <= set(s3["volumes"])
    from spkd.core.settings import Settings

    for key in services["worker"]["environment"]:  # every SPKD_ name is a real setting
        if key.startswith("SPKD_"):
            assert key.removeprefix("SPKD_").lower() in Settings.model_fields, key
