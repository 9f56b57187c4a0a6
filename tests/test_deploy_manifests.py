"""Static checks of deploy/: the compose file, the Kubernetes manifests and the Dockerfile.

Every YAML file under deploy/ is parsed (all documents); the checks are the mistakes that
only show up at deploy time: unpinned images, env names MARS does not read, URLs pointing
at services or ports that do not exist, Services whose targetPort no container opens,
dangling depends_on, stateful services without health checks, a critic worker without a
GPU, and Celery queues other than ingest/embed/index/critic.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"

#: Environment variables MARS containers may set (``MARS_<FIELD>`` of mars/settings.py).
KNOWN_ENV = {
    "MARS_DATABASE_URL",
    "MARS_BROKER_URL",
    "MARS_QDRANT_URL",
    "MARS_OPENSEARCH_URL",
    "MARS_HOME",
    "MARS_CRITIC",
    "MARS_VECTOR_BACKEND",
    "MARS_LEXICAL_BACKEND",
}
#: What every MARS container needs in server mode.
REQUIRED_ENV = {"MARS_DATABASE_URL", "MARS_BROKER_URL", "MARS_QDRANT_URL", "MARS_OPENSEARCH_URL", "MARS_HOME"}
#: URL settings and the scheme each must use.
URL_SCHEMES = {
    "MARS_DATABASE_URL": {"postgresql+psycopg"},
    "MARS_BROKER_URL": {"redis"},
    "MARS_QDRANT_URL": {"http", "https"},
    "MARS_OPENSEARCH_URL": {"http", "https"},
}
DEFAULT_PORTS = {"postgresql+psycopg": 5432, "redis": 6379, "http": 80, "https": 443}
QUEUES = {"ingest", "embed", "index", "critic"}
STATEFUL = {"postgres", "redis", "qdrant", "opensearch"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


# ---------------------------------------------------------------- loading and helpers


def yaml_files() -> list[Path]:
    """Every YAML file under deploy/, sorted."""
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


@cache
def load(path: Path) -> tuple[Any, ...]:
    """All documents of ``path`` (PyYAML safe loader)."""
    with path.open(encoding="utf-8") as fh:
        return tuple(yaml.safe_load_all(fh))


def compose() -> dict[str, Any]:
    """The compose file's one document."""
    (doc,) = load(COMPOSE)
    return doc


def k8s_objects() -> list[dict[str, Any]]:
    """Every Kubernetes object under deploy/k8s (the Kustomization excluded)."""
    return [
        doc
        for path in sorted(K8S.glob("*.yaml"))
        for doc in load(path)
        if doc and doc.get("kind") != "Kustomization"
    ]


def objects(kind: str) -> list[dict[str, Any]]:
    """The Kubernetes objects of one kind."""
    return [o for o in k8s_objects() if o["kind"] == kind]


def namespace(obj: dict[str, Any]) -> str:
    """An object's namespace (``default`` when unset)."""
    return obj["metadata"].get("namespace", "default")


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of a workload's template."""
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any], init: bool = True) -> list[dict[str, Any]]:
    """A workload's containers (and init containers with ``init``)."""
    spec = pod_spec(workload)
    return list(spec.get("containers", [])) + (list(spec.get("initContainers", [])) if init else [])


def workloads() -> list[dict[str, Any]]:
    """Every object with a pod template."""
    return [o for o in k8s_objects() if o["kind"] in WORKLOAD_KINDS]


def image_is_pinned(image: str | None) -> bool:
    """True for ``name:tag`` with a tag other than ``latest``, or ``name@sha256:...``."""
    if not image:
        return False
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return False
    tag = last.rsplit(":", 1)[1]
    return bool(tag) and tag != "latest"


def argv(command: Any) -> list[str]:
    """A compose/Kubernetes command as an argument list."""
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(part) for part in command]


def worker_queues(command: Any) -> list[str] | None:
    """The queues of a ``celery ... worker`` command (``["celery"]`` without ``-Q``), else None."""
    args = argv(command)
    if not args or "celery" not in Path(args[0]).name or "worker" not in args:
        return None
    for i, arg in enumerate(args):
        if arg in ("-Q", "--queues") and i + 1 < len(args):
            return args[i + 1].split(",")
        if arg.startswith("--queues="):
            return arg.split("=", 1)[1].split(",")
        if arg.startswith("-Q") and len(arg) > 2:
            return arg[2:].split(",")
    return ["celery"]


def option(command: Any, short: str, long: str) -> str | None:
    """The value of ``short`` / ``long`` (``-P x``, ``--pool x``, ``--pool=x``) in ``command``."""
    args = argv(command)
    for i, arg in enumerate(args):
        if arg in (short, long) and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(long + "="):
            return arg.split("=", 1)[1]
    return None


def assert_critic_worker_command(command: Any) -> None:
    """The critic worker loads the app (which includes the critic task), runs the threads pool
    so that concurrent requests share micro-batches, and reserves no more than it runs."""
    assert option(command, "-A", "--app") == "workers.app", argv(command)
    assert option(command, "-P", "--pool") == "threads", argv(command)
    assert option(command, "--prefetch-multiplier", "--prefetch-multiplier") == "1", argv(command)


def url_target(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of ``url``, the port defaulted by scheme."""
    parts = urlsplit(url)
    assert parts.hostname, f"no host in {url!r}"
    return parts.scheme, parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme]


def without_compose_vars(value: str) -> str:
    """``value`` with compose ``${VAR...}`` interpolations replaced by a placeholder."""
    return re.sub(r"\$\{[^}]*\}", "x", value)


def is_mars_image(image: str | None) -> bool:
    """True for the MARS image (``mars:<tag>``)."""
    return bool(image) and image.split(":", 1)[0] == "mars"


# ---------------------------------------------------------------- every file


def test_deploy_has_compose_and_k8s() -> None:
    assert COMPOSE.is_file()
    assert (DEPLOY / "Dockerfile").is_file()
    assert len(list(K8S.glob("*.yaml"))) >= 5


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = load(path)
    assert docs, f"{path} has no documents"
    for i, doc in enumerate(docs):
        assert isinstance(doc, dict), f"{path} document {i} is {type(doc).__name__}, not a mapping"
        if path.parent == K8S:
            assert {"apiVersion", "kind"} <= doc.keys(), f"{path} document {i} lacks apiVersion/kind"
            if doc["kind"] != "Kustomization":
                assert doc.get("metadata", {}).get("name"), f"{path} document {i} has no metadata.name"


def test_k8s_object_names_unique() -> None:
    seen: set[tuple[str, str, str]] = set()
    for obj in k8s_objects():
        key = (obj["kind"], namespace(obj), obj["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)


def test_kustomization_lists_every_manifest() -> None:
    (kust,) = load(K8S / "kustomization.yaml")
    listed = set(kust["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


# ---------------------------------------------------------------- compose


def compose_services() -> dict[str, dict[str, Any]]:
    """The compose services by name."""
    return compose()["services"]


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's environment as a dict (mapping or ``KEY=VALUE`` list form)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def compose_container_ports(service: dict[str, Any]) -> set[int]:
    """Ports a compose service listens on inside the network (``expose`` and the container side of ``ports``)."""
    ports = {int(str(p).split("/")[0]) for p in service.get("expose", [])}
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def compose_mars_services() -> dict[str, dict[str, Any]]:
    """The compose services running the MARS image."""
    return {name: s for name, s in compose_services().items() if is_mars_image(s.get("image"))}


def test_compose_images_pinned() -> None:
    for name, service in compose_services().items():
        assert image_is_pinned(service.get("image")), f"compose service {name}: image {service.get('image')!r} not pinned"


def test_compose_mars_env_known_and_urls_resolve() -> None:
    services = compose_services()
    mars = compose_mars_services()
    assert {"api"} <= mars.keys() and len(mars) >= 4
    for name, service in mars.items():
        env = compose_env(service)
        assert env.keys() <= KNOWN_ENV, f"{name}: unknown env {sorted(env.keys() - KNOWN_ENV)}"
        assert REQUIRED_ENV <= env.keys(), f"{name}: missing env {sorted(REQUIRED_ENV - env.keys())}"
        for key, schemes in URL_SCHEMES.items():
            scheme, host, port = url_target(without_compose_vars(env[key]))
            assert scheme in schemes, f"{name}: {key} scheme {scheme!r}"
            assert host in services, f"{name}: {key} points at {host!r}, not a compose service"
            assert port in compose_container_ports(services[host]), f"{name}: {key} port {port} not opened by {host}"
            assert host not in mars, f"{name}: {key} points at a MARS service"
        assert urlsplit(env["MARS_BROKER_URL"]).path in ("", "/0"), "broker on a database other than 0"


def test_compose_depends_on_names_exist() -> None:
    services = compose_services()
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep!r}"
            assert dep != name
            condition = spec.get("condition", "service_started")
            assert condition in {"service_started", "service_healthy", "service_completed_successfully"}
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, which has no healthcheck"


def test_compose_mars_services_wait_for_healthy_stores() -> None:
    for name, service in compose_mars_services().items():
        deps = service.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on without conditions"
        for store in STATEFUL:
            assert deps.get(store, {}).get("condition") == "service_healthy", f"{name} does not wait for {store}"


def test_compose_healthchecks() -> None:
    services = compose_services()
    for name in STATEFUL | {"api"}:
        check = services[name].get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"compose service {name} has no healthcheck"


def test_compose_named_volumes_declared() -> None:
    declared = set(compose().get("volumes") or {})
    used: set[str] = set()
    for name, service in compose_services().items():
        for volume in service.get("volumes", []):
            source = volume.get("source") if isinstance(volume, dict) else str(volume).split(":", 1)[0]
            if source and not source.startswith((".", "/", "~")):
                used.add(source)
                assert source in declared, f"{name}: volume {source!r} not declared"
    assert {"pgdata", "mars-home"} <= used
    for store in STATEFUL:
        assert services_volumes(store), f"compose service {store} keeps no data on a volume"


def services_volumes(name: str) -> list[Any]:
    """The volumes of compose service ``name``."""
    return compose_services()[name].get("volumes", [])


def test_compose_queues_and_gpu_worker() -> None:
    consumed: set[str] = set()
    critic_workers = []
    for name, service in compose_services().items():
        queues = worker_queues(service.get("command"))
        if queues is None:
            continue
        assert set(queues) <= QUEUES, f"{name}: queues {queues} outside {sorted(QUEUES)}"
        consumed |= set(queues)
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        wants_gpu = any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
        if "critic" in queues:
            critic_workers.append(name)
            assert wants_gpu, f"{name} serves the critic queue without a GPU reservation"
            assert_critic_worker_command(service["command"])
        else:
            assert not wants_gpu, f"{name} reserves a GPU it does not need"
    assert consumed == QUEUES, f"queues nobody consumes: {sorted(QUEUES - consumed)}"
    assert critic_workers


def test_compose_mars_image_built_from_dockerfile() -> None:
    for name, service in compose_mars_services().items():
        build = service.get("build")
        assert build, f"{name}: the MARS image must be built here"
        context = (COMPOSE.parent / build["context"]).resolve()
        assert (context / build["dockerfile"]).resolve() == (DEPLOY / "Dockerfile").resolve()


# ---------------------------------------------------------------- kubernetes


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """True when every ``selector`` label is in ``labels``."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def selected_workloads(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Workloads in the Service's namespace whose pod labels its selector matches."""
    selector = service["spec"].get("selector") or {}
    return [
        w for w in workloads()
        if namespace(w) == namespace(service) and matches(selector, w["spec"]["template"]["metadata"].get("labels", {}))
    ]


def container_ports(workload: dict[str, Any]) -> list[dict[str, Any]]:
    """The port entries of a workload's (non-init) containers."""
    return [p for c in containers(workload, init=False) for p in c.get("ports", [])]


def service_named(name: str, ns: str) -> dict[str, Any] | None:
    """The Service ``name`` in namespace ``ns``, if any."""
    found = [s for s in objects("Service") if s["metadata"]["name"] == name and namespace(s) == ns]
    return found[0] if found else None


def resolve_host(host: str, ns: str) -> dict[str, Any] | None:
    """The Service a DNS name (``svc``, ``svc.ns``, ``svc.ns.svc.cluster.local``) refers to."""
    labels = host.split(".")
    if len(labels) > 1:
        ns = labels[1]
    return service_named(labels[0], ns)


def test_k8s_images_pinned() -> None:
    for workload in workloads():
        for container in containers(workload):
            assert image_is_pinned(container.get("image")), (
                f"{workload['kind']}/{workload['metadata']['name']} container {container['name']}: "
                f"image {container.get('image')!r} not pinned"
            )


def test_k8s_service_ports_match_containers() -> None:
    services = objects("Service")
    assert services
    for service in services:
        name = service["metadata"]["name"]
        targets = selected_workloads(service)
        assert targets, f"Service {name} selects no workload"
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for workload in targets:
                ports = container_ports(workload)
                if isinstance(target, int):
                    ok = any(p["containerPort"] == target for p in ports)
                else:
                    ok = any(p.get("name") == target for p in ports)
                assert ok, f"Service {name} targetPort {target!r}: no such port in {workload['metadata']['name']}"


def mars_containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """``(workload, container)`` for every container running the MARS image."""
    for workload in workloads():
        for container in containers(workload):
            if is_mars_image(container.get("image")):
                yield workload, container


def container_env(workload: dict[str, Any], container: dict[str, Any]) -> dict[str, str | None]:
    """A container's environment: ``env`` values and the keys of its ``envFrom`` ConfigMaps/Secrets.

    Values from a ``valueFrom`` reference are None.
    """
    ns = namespace(workload)
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            kind, ref, field = "ConfigMap", source["configMapRef"], "data"
        else:
            kind, ref, field = "Secret", source["secretRef"], "stringData"
        found = [o for o in objects(kind) if o["metadata"]["name"] == ref["name"] and namespace(o) == ns]
        assert found, f"{workload['metadata']['name']}: {kind} {ref['name']!r} not in deploy/k8s"
        env.update({str(k): str(v) for k, v in (found[0].get(field) or {}).items()})
    for item in container.get("env", []):
        env[item["name"]] = str(item["value"]) if "value" in item else None
    return env


def test_k8s_mars_env_known_and_urls_resolve() -> None:
    seen = list(mars_containers())
    assert len(seen) >= 4
    for workload, container in seen:
        where = f"{workload['metadata']['name']}/{container['name']}"
        env = container_env(workload, container)
        assert env.keys() <= KNOWN_ENV, f"{where}: unknown env {sorted(env.keys() - KNOWN_ENV)}"
        assert REQUIRED_ENV <= env.keys(), f"{where}: missing env {sorted(REQUIRED_ENV - env.keys())}"
        for key, schemes in URL_SCHEMES.items():
            scheme, host, port = url_target(env[key])
            assert scheme in schemes, f"{where}: {key} scheme {scheme!r}"
            service = resolve_host(host, namespace(workload))
            assert service is not None, f"{where}: {key} host {host!r} is no Service in deploy/k8s"
            assert port in {p["port"] for p in service["spec"]["ports"]}, f"{where}: {key} port {port} not on {host}"


def test_compose_and_k8s_agree_on_settings() -> None:
    compose_values = {k: v for s in compose_mars_services().values() for k, v in compose_env(s).items()}
    k8s_values = {k: v for w, c in mars_containers() for k, v in container_env(w, c).items()}
    for key in KNOWN_ENV - URL_SCHEMES.keys():
        assert compose_values.get(key) == k8s_values.get(key), f"{key}: compose {compose_values.get(key)!r}, k8s {k8s_values.get(key)!r}"


def test_k8s_statefulsets_have_service_and_probes() -> None:
    statefulsets = {s["metadata"]["name"]: s for s in objects("StatefulSet")}
    assert STATEFUL <= statefulsets.keys()
    for name, sts in statefulsets.items():
        governing = service_named(sts["spec"]["serviceName"], namespace(sts))
        assert governing is not None, f"StatefulSet {name}: serviceName {sts['spec']['serviceName']!r} missing"
        assert sts in selected_workloads(governing), f"StatefulSet {name}: its Service does not select it"
        assert sts["spec"].get("volumeClaimTemplates"), f"StatefulSet {name} keeps no data"
        for container in containers(sts, init=False):
            assert container.get("readinessProbe"), f"{name}/{container['name']} has no readinessProbe"
            assert container.get("livenessProbe"), f"{name}/{container['name']} has no livenessProbe"


def env_value(container: dict[str, Any], name: str) -> str | None:
    """The literal value of env var ``name`` in ``container``."""
    for item in container.get("env", []):
        if item["name"] == name:
            return item.get("value")
    return None


def test_k8s_qdrant_distributed() -> None:
    (sts,) = [s for s in objects("StatefulSet") if s["metadata"]["name"] == "qdrant"]
    assert sts["spec"]["replicas"] == 3
    (container,) = containers(sts, init=False)
    assert env_value(container, "QDRANT__CLUSTER__ENABLED") == "true"
    assert env_value(container, "QDRANT__CLUSTER__P2P__PORT") == "6335"
    assert any(p["containerPort"] == 6335 for p in container["ports"])
    headless = service_named(sts["spec"]["serviceName"], namespace(sts))
    assert headless["spec"].get("clusterIP") == "None"
    assert 6335 in {p["port"] for p in headless["spec"]["ports"]}
    text = (K8S / "qdrant.yaml").read_text()
    assert "shard_number" in text and "replication_factor" in text


def test_k8s_opensearch_three_node_cluster() -> None:
    (sts,) = [s for s in objects("StatefulSet") if s["metadata"]["name"] == "opensearch"]
    replicas = sts["spec"]["replicas"]
    assert replicas == 3
    container = next(c for c in containers(sts, init=False) if "opensearch" in c["image"])
    managers = env_value(container, "cluster.initial_cluster_manager_nodes").split(",")
    assert managers == [f"opensearch-{i}" for i in range(replicas)]
    seeds = env_value(container, "discovery.seed_hosts").split(",")
    for seed in seeds:
        service = resolve_host(seed.split(":")[0], namespace(sts))
        assert service is not None and service["spec"].get("clusterIP") == "None", f"seed {seed} is no headless Service"
        assert sts in selected_workloads(service)
        assert 9300 in {p["port"] for p in service["spec"]["ports"]}
    assert env_value(container, "DISABLE_SECURITY_PLUGIN") == "true"
    assert "private network" in (K8S / "opensearch.yaml").read_text()


def test_k8s_queues_and_gpu_worker() -> None:
    consumed: set[str] = set()
    critic = 0
    for workload in workloads():
        for container in containers(workload, init=False):
            queues = worker_queues(container.get("command", []) + container.get("args", []))
            limits = container.get("resources", {}).get("limits", {})
            gpus = int(limits.get("nvidia.com/gpu", 0))
            if queues is None:
                assert gpus == 0, f"{workload['metadata']['name']} asks for a GPU"
                continue
            assert set(queues) <= QUEUES, f"{workload['metadata']['name']}: queues {queues}"
            consumed |= set(queues)
            if "critic" in queues:
                critic += 1
                spec = pod_spec(workload)
                assert gpus >= 1, "critic worker without nvidia.com/gpu limit"
                assert spec.get("nodeSelector"), "critic worker without a GPU nodeSelector"
                assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
                assert_critic_worker_command(container["command"])
            else:
                assert gpus == 0, f"{workload['metadata']['name']} asks for a GPU it does not need"
    assert consumed == QUEUES, f"queues nobody consumes: {sorted(QUEUES - consumed)}"
    assert critic >= 1


def test_keda_scales_cpu_workers_on_their_queues() -> None:
    scaled = objects("ScaledObject")
    assert scaled
    for obj in scaled:
        target_name = obj["spec"]["scaleTargetRef"]["name"]
        (target,) = [d for d in objects("Deployment") if d["metadata"]["name"] == target_name]
        assert namespace(target) == namespace(obj)
        queues = {q for c in containers(target, init=False) for q in worker_queues(c.get("command")) or []}
        broker = urlsplit(container_env(target, containers(target, init=False)[0])["MARS_BROKER_URL"])
        broker_db = broker.path.strip("/") or "0"
        lists = set()
        for trigger in obj["spec"]["triggers"]:
            assert trigger["type"] == "redis"
            meta = trigger["metadata"]
            lists.add(meta["listName"])
            host, port = meta["address"].rsplit(":", 1)
            service = resolve_host(host, namespace(obj))
            assert service is not None and service["metadata"]["name"] == broker.hostname
            assert int(port) in {p["port"] for p in service["spec"]["ports"]}
            assert meta.get("databaseIndex", "0") == broker_db
            assert int(meta["listLength"]) > 0
        assert lists == queues, f"{obj['metadata']['name']} watches {sorted(lists)}, worker consumes {sorted(queues)}"
    assert {"ingest", "embed"} <= {t["metadata"]["listName"] for o in scaled for t in o["spec"]["triggers"]}


# ---------------------------------------------------------------- Dockerfile


def test_dockerfile() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert [line for line in lines if line.startswith("FROM ")] == ["FROM python:3.11-slim"]
    installs = [line for line in lines if "pip install" in line]
    assert any(re.search(r"pip install \"?\.", line) for line in installs), "the image must pip install ."
    assert not any("torchvision" in line for line in installs), "torchvision must not be installed"
    torch_pin = next(
        d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"] if d.startswith("torch==")
    )
    assert torch_pin in text, f"the Dockerfile must install {torch_pin} like pyproject.toml"
    compose_tags = {s["image"] for s in compose_mars_services().values()}
    assert "mars:0.1.0" in compose_tags
