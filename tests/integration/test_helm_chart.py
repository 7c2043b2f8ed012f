"""The Helm chart, rendered and linted by real Helm (helm-python-sdk bundles Helm v4),
offline: no cluster. Every rendered object is validated against the Kubernetes
schemas (kubernetes-validate, strict) or the prometheus-operator CRDs in
shared/k8s-crds/; the exporter config the chart renders passes the exporter's own
config loader with the chart's volumes laid out as the kubelet would.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from exporter import __version__
from exporter.cli import main as cli_main
from exporter.config import Config, load_config
from exporter.generate import helm as helm_gen
from tests.exporter_process import ROOT
from tests.integration.components import _missing

_IMPORT_ERROR = ""
try:
    import helm_python as helm
    import kubernetes_validate
except ImportError as exc:  # the dev extra installs both
    helm = kubernetes_validate = None
    _IMPORT_ERROR = str(exc)

CHART = ROOT / "helm" / "a3mailer-exporter"
CRD_DIR = ROOT.parent / "shared" / "k8s-crds"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSIONS = ("1.29", "1.37")  # the chart's lowest supported and the newest schemas
RELEASE, NAMESPACE = "mail", "monitoring"


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    if helm is None:
        _missing(f"helm-python-sdk / kubernetes-validate missing ({_IMPORT_ERROR}): "
                 "pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def chart() -> Iterator[Any]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders, parsed (a fresh copy: tests may change it)."""
    return copy.deepcopy(_render(chart, json.dumps(values, sort_keys=True)))


@functools.lru_cache(maxsize=64)
def _render(chart: Any, values: str) -> list[dict[str, Any]]:
    manifests = chart.render(json.loads(values), name=RELEASE, namespace=NAMESPACE)
    objects = []
    for name, text in sorted(manifests.items()):
        if name.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def notes(chart: Any, values: dict[str, Any] | None = None) -> str:
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return next(text for name, text in manifests.items() if name.endswith("NOTES.txt"))


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def ci_values(path: Path | None) -> dict[str, Any] | None:
    return yaml.safe_load(path.read_text()) if path else None


def exporter_configmap(objects: list[dict[str, Any]]) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == "ConfigMap" and "config.yaml" in o["data"]]
    assert len(found) == 1, f"{len(found)} exporter ConfigMaps"
    return found[0]


def exporter_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(exporter_configmap(objects)["data"]["config.yaml"])


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


# --------------------------------------------------------------------------- lint


@pytest.mark.parametrize("values_file", [None, *CI_VALUES],
                         ids=lambda p: p.name if p else "no-values")
def test_lint_strict(values_file: Path | None) -> None:
    report = helm.lint(CHART, ci_values(values_file), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_ci_values_cover_the_required_cases() -> None:
    assert {p.name for p in CI_VALUES} >= {"default-values.yaml", "multi-replica-values.yaml",
                                           "everything-values.yaml", "nothing-values.yaml"}


# --------------------------------------------------------------------------- schemas


def _strict(schema: Any) -> Any:
    """A CRD schema as kubectl --validate=strict applies it: unknown fields are errors
    wherever the CRD lists properties and does not preserve unknown fields."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    validators = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = _strict(version["schema"]["openAPIV3Schema"])
                validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(
                    schema)
    return validators


def validate_object(obj: dict[str, Any]) -> None:
    key = (obj["apiVersion"], obj["kind"])
    if key == ("grafana.integreatly.org/v1beta1", "GrafanaDashboard"):
        # No grafana-operator CRD is at hand: check what the operator needs.
        spec = obj["spec"]
        assert set(spec) <= {"instanceSelector", "folder", "allowCrossNamespaceImport",
                             "configMapRef", "json", "resyncPeriod"}, spec.keys()
        assert "matchLabels" in spec["instanceSelector"] or (
            "matchExpressions" in spec["instanceSelector"])
        assert ("json" in spec) != ("configMapRef" in spec)
        if "json" in spec:
            json.loads(spec["json"])
        return
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        if not CRD_DIR.is_dir():
            _missing(f"{CRD_DIR} (prometheus-operator CRDs) missing")
        assert key in crd_validators(), f"no CRD for {key}"
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in crd_validators()[key].iter_errors(obj)]
        assert errors == [], f"{obj['kind']} {obj['metadata']['name']}: {errors}"
        return
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            raise AssertionError(f"{obj['kind']} {obj['metadata']['name']} (Kubernetes "
                                 f"{version}): {path}: {exc.message}") from None


@pytest.mark.parametrize("values_file", [None, *CI_VALUES],
                         ids=lambda p: p.name if p else "no-values")
def test_every_rendered_object_validates(chart: Any, values_file: Path | None) -> None:
    objects = render(chart, ci_values(values_file))
    assert objects
    for obj in objects:
        validate_object(obj)


def test_validation_can_fail() -> None:
    """The validators reject what a cluster would: an unknown field, a wrong type."""
    with pytest.raises(AssertionError, match="selectr"):
        validate_object({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
                         "spec": {"ports": [{"port": 80}], "selectr": {"app": "x"}}})
    with pytest.raises(AssertionError, match="sampleLimit"):
        validate_object({"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
                         "metadata": {"name": "x"},
                         "spec": {"selector": {}, "endpoints": [], "sampleLimit": "many"}})
    with pytest.raises(AssertionError, match="scrapeTimout"):
        validate_object({"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
                         "metadata": {"name": "x"},
                         "spec": {"selector": {}, "podMetricsEndpoints": [
                             {"port": "http", "scrapeTimout": "5s"}]}})


def test_objects_per_ci_file(chart: Any) -> None:
    assert kinds(render(chart)) == ["ConfigMap"] * 7 + [
        "Deployment", "PersistentVolumeClaim", "PrometheusRule", "Service", "ServiceAccount",
        "ServiceMonitor"]
    assert kinds(render(chart, ci_values(CHART / "ci/nothing-values.yaml"))) == [
        "ConfigMap", "Deployment", "Service"]
    everything = kinds(render(chart, ci_values(CHART / "ci/everything-values.yaml")))
    for kind in ("GrafanaDashboard", "Ingress", "NetworkPolicy", "PersistentVolumeClaim",
                 "PodDisruptionBudget", "PodMonitor", "PrometheusRule", "Secret",
                 "ServiceAccount", "ServiceMonitor"):
        assert kind in everything
    multi = render(chart, ci_values(CHART / "ci/multi-replica-values.yaml"))
    assert "PersistentVolumeClaim" not in kinds(multi)


# --------------------------------------------------------------------------- values schema


def test_values_schema_rejects_wrong_type_and_unknown_key(chart: Any) -> None:
    with pytest.raises(helm.HelmValuesError, match="cpu_usage_threshold.*want number"):
        chart.render({"config": {"monitoring": {"alert_thresholds": {
            "cpu_usage_threshold": "high"}}}}, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmValuesError, match="cpu_usage_treshold.*not allowed"):
        chart.render({"config": {"monitoring": {"alert_thresholds": {
            "cpu_usage_treshold": 90}}}}, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmValuesError, match="replicass"):
        chart.validate_schema({"replicass": 2})
    with pytest.raises(helm.HelmValuesError, match="existingSecretKeys"):
        chart.validate_schema({"secrets": {"existingSecretKeys": ["security.no_such"]}})
    # a secret the exporter would refuse at start (pods in a crash loop) fails the install
    with pytest.raises(helm.HelmValuesError, match="admin_token"):
        chart.validate_schema({"secrets": {"security": {"admin_token": "short"}}})
    chart.validate_schema({"secrets": {"security": {"admin_token": "x" * 16}}})
    lint = helm.lint(CHART, {"config": {"server": {"listen_address": 10587}}}, strict=True)
    assert any("listen_address" in e for e in lint["errors"]), lint


@pytest.mark.parametrize("values", [
    {"redis": {"url": "redis://:s3cretpw@redis:6379/0"}},
    {"redis": {"url": "redis-master:6379"}},  # no scheme: the exporter refuses it
    {"config": {"security": {"store": {"type": "redis",
                                       "redis_url": "redis://user:s3cretpw@r:6379/0"}}}},
    {"config": {"monitoring": {"stalwart": {"url": "http://admin:s3cretpw@stalwart:8080"}}}},
    {"config": {"tracing": {"otlp_endpoint": "http://u:s3cretpw@otel:4318"}}},
    {"prometheusRule": {"ruleLabels": {"team-name": "x"}}},
    {"prometheusRule": {"ruleLabels": {"severity": "page"}}},
    {"config": {"alerting": {"labels": {"severity": "page"}}}},
    {"config": {"alerting": {"selector": 'job="a"}, env="b"'}}},
])
def test_values_the_exporter_or_prometheus_would_refuse_fail_the_install(chart: Any,
                                                                         values) -> None:
    """Each rendered before: a password into the ConfigMap and a pod in a crash loop, or
    rules Prometheus refuses whole."""
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


def test_an_acl_user_in_the_redis_url_and_fine_labels_still_render(chart: Any) -> None:
    chart.validate_schema({"redis": {"url": "rediss://exporter@redis:6380/0"},
                           "prometheusRule": {"ruleLabels": {"team": "mail"}},
                           "config": {"alerting": {"selector":
                                                   'job="mail", env=~"prod|\\"x\\""'}}})


def test_values_hold_the_config_verbatim(chart: Any) -> None:
    """values.yaml's `config:` is the exporter's embedded defaults with the chart's
    overrides (listen on the pod's interfaces), key for key."""
    from exporter.config.loader import merge

    expected = merge(load_config().data, helm_gen.CONFIG_OVERRIDES)
    assert chart.values["config"] == expected
    assert chart.values["config"]["server"]["listen_address"] == "0.0.0.0:10587"
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["properties"]["config"]["properties"].keys() == expected.keys()
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(chart.values)


def test_chart_versions_follow_the_exporter(chart: Any) -> None:
    assert chart.metadata["appVersion"] == __version__
    assert container(render(chart))["image"] == f"a3mailer/a3mailer-exporter:{__version__}"


# --------------------------------------------------------------------------- replicas


def test_two_replicas_without_redis_fail_clearly(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"replicas: 2 needs a shared security "
                                                   r"store.*set redis\.url"):
        chart.render({"replicas": 2}, name=RELEASE, namespace=NAMESPACE)
    # Without the security engine there is no shared state to lose.
    render(chart, {"replicas": 2, "config": {"security": {"enabled": False}}})
    redis = {"url": "redis://redis:6379/0"}
    with pytest.raises(helm.HelmRenderError, match=r"needs the keys every pod must share.*"
                       r"secrets\.security\.mfa\.encryption_key .*secrets\.security\.csrf_key"):
        chart.render({"replicas": 2, "redis": redis}, name=RELEASE, namespace=NAMESPACE)
    with pytest.raises(helm.HelmRenderError, match=r"set secrets\.security\.csrf_key \(or"):
        chart.render({"replicas": 2, "redis": redis, "secrets": {"security": {
            "mfa": {"encryption_key": "k" * 40}}}}, name=RELEASE, namespace=NAMESPACE)
    render(chart, {"replicas": 2, "redis": redis,
                   "secrets": {"security": {"mfa": {"encryption_key": "k" * 40}}},
                   "extraEnv": [{"name": "A3MAILER_CSRF_KEY", "valueFrom": {
                       "secretKeyRef": {"name": "csrf", "key": "key"}}}]})


def test_two_replicas_share_redis(chart: Any) -> None:
    objects = render(chart, ci_values(CHART / "ci/multi-replica-values.yaml"))
    store = exporter_config(objects)["security"]["store"]
    assert store["type"] == "redis"
    assert store["redis_url"] == "redis://redis-master.mail.svc:6379/0"
    assert store["redis_password_file"] == "/etc/a3mailer-exporter/redis/password"
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    redis = next(v for v in pod["volumes"] if v["name"] == "redis-password")
    assert redis["secret"] == {"secretName": "redis", "defaultMode": 0o440,
                               "items": [{"key": "redis-password", "path": "password"}]}
    state = next(v for v in pod["volumes"] if v["name"] == "state")
    assert state == {"name": "state", "emptyDir": {}}
    assert only(objects, "Deployment")["spec"]["replicas"] == 2
    assert "strategy" not in only(objects, "Deployment")["spec"]


def test_one_replica_keeps_state_on_a_pvc(chart: Any) -> None:
    objects = render(chart)
    deployment = only(objects, "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pvc = only(objects, "PersistentVolumeClaim")
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    state = next(v for v in volumes if v["name"] == "state")
    assert state["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    mount = next(m for m in container(objects)["volumeMounts"] if m["name"] == "state")
    assert mount["mountPath"] == exporter_config(objects)["server"]["state_dir"]
    existing = render(chart, {"persistence": {"existingClaim": "old-state"}})
    assert "PersistentVolumeClaim" not in kinds(existing)
    volumes = only(existing, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert next(v for v in volumes if v["name"] == "state")["persistentVolumeClaim"] == {
        "claimName": "old-state"}


# --------------------------------------------------------------------------- pod


def test_pod_is_locked_down(chart: Any) -> None:
    objects = render(chart)
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    main = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10587  # the Dockerfile's USER
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    ctx = main["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert main["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["startupProbe"]["httpGet"]["path"] == "/livez"
    assert main["resources"]["limits"]["memory"] == "256Mi"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "USER 10587:10587" in dockerfile


def test_config_change_rolls_the_pods(chart: Any) -> None:
    def checksum(values: dict[str, Any] | None) -> str:
        annotations = only(render(chart, values), "Deployment")["spec"]["template"][
            "metadata"]["annotations"]
        return annotations["checksum/config"]

    base = checksum(None)
    assert checksum({"replicas": 1, "serviceMonitor": {"interval": "1m"}}) == base
    assert checksum({"config": {"monitoring": {"alert_thresholds": {
        "cpu_usage_threshold": 90}}}}) != base


# --------------------------------------------------------------------------- config and secrets


def _lay_out_pod(objects: list[dict[str, Any]], root: Path) -> dict[str, str]:
    """Writes the container's ConfigMap and Secret volumes under root as the kubelet
    would (existing Secrets get placeholder values); returns mountPath -> local dir."""
    by_kind_name = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    pod = only(objects, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mapping = {}
    for mount in container(objects)["volumeMounts"]:
        local = root / mount["mountPath"].lstrip("/")
        local.mkdir(parents=True, exist_ok=True)
        mapping[mount["mountPath"]] = str(local)
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            data = by_kind_name[("ConfigMap", volume["configMap"]["name"])]["data"]
        elif "secret" in volume:
            secret = by_kind_name.get(("Secret", volume["secret"]["secretName"]))
            placeholder = "placeholder-" * 4  # long enough for every key's minimum
            data = ({k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
                    if secret else {i["key"]: placeholder for i in volume["secret"]["items"]})
        else:
            continue
        items = volume.get("configMap", volume.get("secret", {})).get("items")
        for item in items or [{"key": k, "path": k} for k in data]:
            (local / item["path"]).write_text(data[item["key"]])
    return mapping


def _remap(node: Any, mapping: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _remap(v, mapping) for k, v in node.items()}
    if isinstance(node, list):
        return [_remap(v, mapping) for v in node]
    if isinstance(node, str):
        for mount, local in mapping.items():
            if node == mount or node.startswith(mount + "/"):
                return local + node[len(mount):]
    return node


@pytest.mark.parametrize("values_file", [None, *CI_VALUES],
                         ids=lambda p: p.name if p else "no-values")
def test_rendered_config_passes_check_config(chart: Any, values_file: Path | None,
                                             tmp_path: Path, capsys) -> None:
    objects = render(chart, ci_values(values_file))
    mapping = _lay_out_pod(objects, tmp_path / "pod")
    args = container(objects)["args"]
    assert args[0] == "--config"
    config_path = Path(_remap(args[1], mapping))
    assert config_path.is_file(), "the container's --config is not in a mounted volume"
    local = _remap(yaml.safe_load(config_path.read_text()), mapping)
    config_path.write_text(yaml.safe_dump(local))
    assert cli_main(["check-config", str(config_path)]) == 0, capsys.readouterr().err
    load_config(config_path)  # and the secrets it names are readable where mounted


def test_secrets_are_files_never_config(chart: Any, tmp_path: Path) -> None:
    values = {"secrets": {"security": {"admin_token": "t0ken-admin-0123456",
                                       "dovecot_policy": {"api_key": "dovecot-k3y"}}}}
    objects = render(chart, values)
    secret = only(objects, "Secret")
    assert sorted(secret["data"]) == ["security.admin_token", "security.dovecot_policy.api_key"]
    config = exporter_config(objects)
    assert config["security"]["admin_token_file"] == (
        "/etc/a3mailer-exporter/secrets/security.admin_token")
    assert config["security"]["dovecot_policy"]["api_key_file"] == (
        "/etc/a3mailer-exporter/secrets/security.dovecot_policy.api_key")
    configmap = yaml.safe_dump(exporter_configmap(objects))
    assert "t0ken-admin-0123456" not in configmap and "dovecot-k3y" not in configmap
    mapping = _lay_out_pod(objects, tmp_path)
    path = Path(_remap(config["security"]["admin_token_file"], mapping))
    assert path.read_text() == "t0ken-admin-0123456"
    assert "No admin token is set" not in notes(chart, values)
    assert "No admin token is set" in notes(chart)


def test_existing_secret(chart: Any) -> None:
    objects = render(chart, {"secrets": {
        "existingSecret": "a3m-secrets",
        "existingSecretKeys": ["security.admin_token", "security.stalwart_webhook.secret"],
        "security": {"admin_token": "ignored-when-existing"}}})
    assert "Secret" not in kinds(objects)
    volume = next(v for v in only(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == "secrets")
    assert volume["secret"]["secretName"] == "a3m-secrets"
    assert [i["key"] for i in volume["secret"]["items"]] == [
        "security.admin_token", "security.stalwart_webhook.secret"]
    config = exporter_config(objects)
    assert config["security"]["stalwart_webhook"]["secret_file"] == (
        "/etc/a3mailer-exporter/secrets/security.stalwart_webhook.secret")
    assert config["security"]["admin_token_file"].endswith("/security.admin_token")


def test_every_config_secret_is_a_chart_secret() -> None:
    """The chart's secret keys are derived from the schema: one per secret_file key."""
    schema = json.loads((ROOT / "exporter/config/config.schema.json").read_text())
    text = json.dumps(schema)
    assert text.count('"$ref": "#/definitions/secret_file"') == len(helm_gen.secret_keys())
    assert "security.admin_token" in helm_gen.secret_keys()
    assert "security.dovecot_policy.api_key" in helm_gen.secret_keys()
    assert "security.stalwart_webhook.secret" in helm_gen.secret_keys()


# --------------------------------------------------------------------------- scraping


async def test_monitors_scrape_what_the_exporter_serves(chart: Any, tmp_path: Path) -> None:
    """ServiceMonitor and PodMonitor name the port the Service and the container call
    `http`, which is the port of the exporter's listen_address; the path they scrape is
    served, with metrics, by the exporter built from the rendered config."""
    from exporter.http import create_app
    from exporter.service import Exporter

    objects = render(chart, {"podMonitor": {"enabled": True}})
    config = exporter_config(objects)
    listen_port = int(config["server"]["listen_address"].rpartition(":")[2])
    ports = {p["name"]: p for p in container(objects)["ports"]}
    assert ports["http"]["containerPort"] == listen_port
    service = only(objects, "Service")
    service_port = next(p for p in service["spec"]["ports"] if p["name"] == "http")
    assert service_port["targetPort"] == "http"
    pod_labels = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()

    sm = only(objects, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    pm = only(objects, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    endpoints = [sm["spec"]["endpoints"][0], pm["spec"]["podMetricsEndpoints"][0]]
    for endpoint in endpoints:
        assert endpoint["port"] == "http"
        assert endpoint["scheme"] == "http"
        assert endpoint["relabelings"][0] == {"action": "replace", "targetLabel": "job",
                                              "replacement": "a3mailer-exporter"}

    config["server"]["state_dir"] = str(tmp_path / "state")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    exporter = Exporter(load_config(path))
    exporter.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(exporter)),
                                     base_url="http://exporter") as client:
            for endpoint in endpoints:
                answer = await client.get(endpoint["path"])
                assert answer.status_code == 200
                assert "a3mailer_exporter_build_info" in answer.text
    finally:
        if exporter.audit is not None:
            exporter.audit.close()


def test_monitor_limits_and_labels(chart: Any) -> None:
    objects = render(chart, ci_values(CHART / "ci/everything-values.yaml"))
    sm = only(objects, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert {k: sm["spec"][k] for k in ("sampleLimit", "targetLimit", "labelLimit",
                                        "labelNameLengthLimit", "labelValueLengthLimit")} == {
        "sampleLimit": 50000, "targetLimit": 10, "labelLimit": 40,
        "labelNameLengthLimit": 128, "labelValueLengthLimit": 1024}
    endpoint = sm["spec"]["endpoints"][0]
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "5s")
    assert endpoint["authorization"]["credentials"] == {"name": "scrape-token", "key": "token"}
    pm = only(objects, "PodMonitor")
    assert pm["spec"]["sampleLimit"] == 30000
    assert pm["spec"]["podMetricsEndpoints"][0]["interval"] == "1m"
    # Limits left at 0 are left out; the default sampleLimit protects Prometheus.
    default = only(render(chart), "ServiceMonitor")["spec"]
    assert default["sampleLimit"] == 20000 and "targetLimit" not in default


def test_tls_listener_switches_schemes(chart: Any) -> None:
    objects = render(chart, {"config": {"server": {"tls": {
        "cert_file": "/etc/tls/tls.crt", "key_file": "/etc/tls/tls.key"}}},
        "serviceMonitor": {"tlsConfig": {"insecureSkipVerify": True}}})
    assert only(objects, "ServiceMonitor")["spec"]["endpoints"][0]["scheme"] == "https"
    assert container(objects)["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    for obj in objects:
        validate_object(obj)
    # mutual TLS: kubelet has no client certificate, so the probes connect over TCP
    mutual = container(render(chart, {"config": {"server": {"tls": {
        "cert_file": "/etc/tls/tls.crt", "key_file": "/etc/tls/tls.key",
        "client_ca_file": "/etc/tls/ca.crt"}}}}))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert mutual[probe]["tcpSocket"] == {"port": "http"} and "httpGet" not in mutual[probe]


def test_postfix_policy_port(chart: Any) -> None:
    objects = render(chart, {"config": {"security": {"postfix_policy": {"enabled": True}}}})
    ports = {p["name"]: p for p in container(objects)["ports"]}
    assert ports["postfix-policy"]["containerPort"] == 10588
    service = {p["name"]: p for p in only(objects, "Service")["spec"]["ports"]}
    assert service["postfix-policy"]["targetPort"] == "postfix-policy"
    assert "check_policy_service inet:mail-a3mailer-exporter.monitoring.svc:10588" in notes(
        chart, {"config": {"security": {"postfix_policy": {"enabled": True}}}})
    assert "postfix-policy" not in {p["name"] for p in container(render(chart))["ports"]}


def test_notes_tell_where_things_are(chart: Any) -> None:
    text = notes(chart)
    assert "http://mail-a3mailer-exporter.monitoring.svc:10587/metrics" in text
    assert "/dovecot/policy" in text
    assert "serviceMonitor.labels.release" in text
    both = notes(chart, {"podMonitor": {"enabled": True}})
    assert "scraped twice" in both


def test_values_copy_is_untouched(chart: Any) -> None:
    """Rendering never changes the chart's defaults (the config helper deep-copies)."""
    before = copy.deepcopy(chart.values)
    render(chart, {"secrets": {"security": {"admin_token": "x" * 16}},
                   "redis": {"url": "redis://r"}})
    assert chart.values == before


# --------------------------------------------------------------------------- rules and dashboards
# The chart carries the generated rules and dashboards with placeholders
# (exporter/generate/helm_bundle.py) and fills them from .Values.config at render time;
# the generator bakes the same config in. The two must agree, value for value.


def _generated(config: Config) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """What `a3mailer-exporter generate` writes for config: rule groups (recording first,
    as the chart orders them) and dashboards by key."""
    from exporter.generate import alerts, dashboards, grafana

    groups = (alerts.render_recording_rules(config)["groups"]
              + alerts.render_rules(config)["groups"])
    boards = {key: json.loads(grafana.dashboard_json(config, key)) for key in dashboards.KEYS}
    return groups, boards


def _rendered_boards(objects: list[dict[str, Any]]) -> dict[str, Any]:
    boards = {}
    for obj in objects:
        if obj["kind"] == "ConfigMap" and "-dashboard-" in obj["metadata"]["name"]:
            (key, text), = obj["data"].items()
            boards[key.removesuffix(".json")] = json.loads(text)
    return boards


def _config_with(overrides: dict[str, Any], tmp_path: Path) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(overrides))
    return load_config(path)


def test_default_render_is_the_generated_bundle(chart: Any) -> None:
    """With the default values the PrometheusRule holds exactly alert-rules/*.yaml and the
    dashboard ConfigMaps exactly dashboards/*.json."""
    objects = render(chart)
    rules = yaml.safe_load((ROOT / "alert-rules/alerts.yaml").read_text())
    recording = yaml.safe_load((ROOT / "alert-rules/recording-rules.yaml").read_text())
    assert only(objects, "PrometheusRule")["spec"]["groups"] == (
        recording["groups"] + rules["groups"])
    boards = _rendered_boards(objects)
    files = {p.stem: json.loads(p.read_text()) for p in (ROOT / "dashboards").glob("*.json")}
    assert boards == files and len(boards) == 6


def test_threshold_override_changes_rule_configmap_and_dashboard(chart: Any,
                                                                  tmp_path: Path) -> None:
    """`--set config.monitoring.alert_thresholds.cpu_usage_threshold=90` changes the alert's
    expression and description, the exporter's config and the dashboards' threshold steps,
    to what the generator writes for a config with 90."""
    values = helm.parse_set_string("config.monitoring.alert_thresholds.cpu_usage_threshold=90")
    objects = render(chart, values)
    assert exporter_config(objects)["monitoring"]["alert_thresholds"][
        "cpu_usage_threshold"] == 90
    groups = only(objects, "PrometheusRule")["spec"]["groups"]
    cpu = next(r for g in groups for r in g["rules"] if r.get("alert") == "A3MailerHighCpuUsage")
    assert cpu["expr"] == 'a3mailer_system_cpu_usage_ratio{job="a3mailer-exporter"} * 100 > 90'
    assert "above the threshold of 90%" in cpu["annotations"]["description"]
    boards = _rendered_boards(objects)
    cpu_panels = [p for p in boards["system"]["panels"]
                  if "cpu_usage_ratio" in json.dumps(p.get("targets", []))]
    assert cpu_panels
    for panel in cpu_panels:
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert steps[-1]["value"] == 90, panel["title"]

    expected_groups, expected_boards = _generated(_config_with(
        {"monitoring": {"alert_thresholds": {"cpu_usage_threshold": 90}}}, tmp_path))
    assert groups == expected_groups
    assert boards == expected_boards
    default_groups = only(render(chart), "PrometheusRule")["spec"]["groups"]
    assert default_groups != groups  # the override is what changed them


def test_every_threshold_reaches_rules_and_dashboards(chart: Any, tmp_path: Path) -> None:
    """Each threshold, set to an odd value, renders as the generator renders it."""
    thresholds = chart.values["config"]["monitoring"]["alert_thresholds"]
    odd = {name: (value * 3 + 7 if isinstance(value, int) else value * 0.5)
           for name, value in thresholds.items()}
    odd = {k: min(v, 100) if "usage" in k or k == "error_rate_threshold" else v
           for k, v in odd.items()}
    overrides = {"monitoring": {"alert_thresholds": odd}}
    objects = render(chart, {"config": overrides})
    expected_groups, expected_boards = _generated(_config_with(overrides, tmp_path))
    assert only(objects, "PrometheusRule")["spec"]["groups"] == expected_groups
    assert _rendered_boards(objects) == expected_boards


def test_alert_overrides_come_from_values(chart: Any, tmp_path: Path) -> None:
    alerting = {
        "selector": 'job="mail-exporter"',
        "labels": {"team": "mail"},
        "dashboard_url": "https://grafana.example.com/d/{uid}/{slug}",
        "runbook_url": "https://wiki.example.com/{family}#{anchor}",
        "keep_firing_for": "15m",
        "alerts": {
            "A3MailerHighCpuUsage": {"severity": "critical", "for": "30m",
                                     "labels": {"pager": "yes"},
                                     "annotations": {"note": "call the host team"}},
            "A3MailerDiskSpaceLow": {"enabled": False},
            "A3MailerHighMemoryUsage": {"keep_firing_for": "0s"},
            "A3MailerDiskWillFillSoon": {"keep_firing_for": "2m"},
        },
    }
    expected, _ = _generated(_config_with({"alerting": alerting}, tmp_path))
    objects = render(chart, {"config": {"alerting": alerting}})
    assert only(objects, "PrometheusRule")["spec"]["groups"] == expected
    cpu = next(r for g in expected for r in g["rules"] if r.get("alert") == "A3MailerHighCpuUsage")
    assert cpu["labels"] == {"severity": "critical", "team": "mail", "pager": "yes"}
    assert cpu["for"] == "30m" and "for 30m" in cpu["annotations"]["description"]
    rules = {r.get("alert"): r for g in expected for r in g["rules"]}
    assert cpu["keep_firing_for"] == "15m"  # hysteresis: the global value, from the values
    assert "keep_firing_for" not in rules["A3MailerHighMemoryUsage"]  # 0s turns it off
    assert rules["A3MailerDiskWillFillSoon"]["keep_firing_for"] == "2m"  # expression alert
    assert cpu["annotations"]["runbook_url"] == "https://wiki.example.com/system#a3mailerhighcpuusage"
    assert 'job="mail-exporter"' in cpu["expr"]
    names = {r.get("alert") for g in expected for r in g["rules"]}
    assert "A3MailerDiskSpaceLow" not in names
    # the selector reaches the dashboards too
    board = _rendered_boards(objects)["system"]
    assert 'job=\\"mail-exporter\\"' in json.dumps(board) and "<<sel>>" not in json.dumps(board)


def test_a_disabled_family_has_no_group_in_chart_or_generate(chart: Any, tmp_path: Path) -> None:
    """A family whose alerts are all disabled leaves no empty rule group, in the chart's
    PrometheusRule as in alert-rules/alerts.yaml."""
    from exporter.generate import alerts

    disabled = {a.name: {"enabled": False} for a in alerts.ALERTS if a.family == "system"}
    overrides = {"alerting": {"alerts": disabled}}
    expected, _ = _generated(_config_with(overrides, tmp_path))
    rule = only(render(chart, {"config": overrides}), "PrometheusRule")
    validate_object(rule)
    assert rule["spec"]["groups"] == expected
    assert [g["name"] for g in expected] == [
        "a3mailer-recording", "a3mailer-application", "a3mailer-mail", "a3mailer-security",
        "a3mailer-exporter"]


def test_url_patterns_fill_the_same_placeholders_in_chart_and_generate(chart: Any,
                                                                       tmp_path: Path) -> None:
    pattern = "https://wiki.example/{family}/{alertname}/{anchor}/{uid}/{slug}"
    overrides = {"alerting": {"runbook_url": pattern + "#rb", "dashboard_url": pattern + "?d"}}
    expected, _ = _generated(_config_with(overrides, tmp_path))
    groups = only(render(chart, {"config": overrides}), "PrometheusRule")["spec"]["groups"]
    assert groups == expected
    cpu = next(r for g in groups for r in g["rules"] if r.get("alert") == "A3MailerHighCpuUsage")
    filled = ("https://wiki.example/system/A3MailerHighCpuUsage/a3mailerhighcpuusage/"
              "a3mailer-system/a3mailer-system")
    assert cpu["annotations"]["runbook_url"] == filled + "#rb"
    assert cpu["annotations"]["dashboard_url"] == filled + "?d"


def test_chart_rule_knobs(chart: Any) -> None:
    """prometheusRule.disabled, .ruleLabels and .namePrefix (the chart's own knobs)."""
    objects = render(chart, {"prometheusRule": {
        "disabled": ["A3MailerHighMemoryUsage"], "ruleLabels": {"cluster_owner": "mail"},
        "namePrefix": "prod-", "labels": {"release": "kube-prometheus-stack"}}})
    rule = only(objects, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    groups = rule["spec"]["groups"]
    assert all(g["name"].startswith("prod-a3mailer-") for g in groups)
    alerts_ = [r for g in groups for r in g["rules"] if "alert" in r]
    assert "A3MailerHighMemoryUsage" not in {r["alert"] for r in alerts_}
    assert all(r["labels"]["cluster_owner"] == "mail" for r in alerts_)
    records = [r for g in groups for r in g["rules"] if "record" in r]
    assert records and all("cluster_owner" not in r.get("labels", {}) for r in records)
    with pytest.raises(helm.HelmRenderError, match="A3MailerNoSuchAlert"):
        chart.render({"config": {"alerting": {"alerts": {"A3MailerNoSuchAlert": {
            "enabled": False}}}}}, name=RELEASE, namespace=NAMESPACE)


def test_rendered_rules_pass_promtool_and_the_alert_unit_tests(chart: Any,
                                                              tmp_path: Path) -> None:
    """The PrometheusRule's groups, extracted from a render as prometheus-operator writes
    them to Prometheus, pass `promtool check rules` and every unit test in
    alert-rules/tests/ (rule_files pointed at the extracted file)."""
    import subprocess

    from tests.integration.components import require_binary

    promtool = require_binary("promtool")
    rules_file = tmp_path / "chart-rules.yaml"
    rules_file.write_text(yaml.safe_dump(
        {"groups": only(render(chart), "PrometheusRule")["spec"]["groups"]}))
    checked = subprocess.run([promtool, "check", "rules", str(rules_file)],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tests = sorted((ROOT / "alert-rules/tests").glob("*.test.yaml"))
    assert tests
    copies = []
    for path in tests:
        case = yaml.safe_load(path.read_text())
        case["rule_files"] = [str(rules_file)]
        copy_path = tmp_path / path.name
        copy_path.write_text(yaml.safe_dump(case, sort_keys=False))
        copies.append(str(copy_path))
    tested = subprocess.run([promtool, "test", "rules", *copies], capture_output=True,
                            text=True, timeout=300)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert tested.stdout.count("SUCCESS") == len(tests)


def test_dashboard_objects(chart: Any) -> None:
    objects = render(chart, {"dashboards": {"label": "grafana_dashboards", "labelValue": "yes",
                                            "folder": "Mail", "namespace": "grafana",
                                            "grafanaOperator": {"enabled": True}}})
    maps = [o for o in objects if o["kind"] == "ConfigMap" and "-dashboard-" in
            o["metadata"]["name"]]
    assert len(maps) == 6
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboards"] == "yes"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "Mail"}
        assert cm["metadata"]["namespace"] == "grafana"
    operator = [o for o in objects if o["kind"] == "GrafanaDashboard"]
    assert {o["spec"]["configMapRef"]["name"] for o in operator} == {
        cm["metadata"]["name"] for cm in maps}
    assert all(o["spec"]["folder"] == "Mail" for o in operator)
    inline = render(chart, {"dashboards": {"enabled": False,
                                           "grafanaOperator": {"enabled": True}}})
    dashboards_ = [o for o in inline if o["kind"] == "GrafanaDashboard"]
    assert len(dashboards_) == 6 and all(json.loads(o["spec"]["json"])["uid"]
                                         for o in dashboards_)
    assert not [o for o in inline if o["kind"] == "ConfigMap" and "-dashboard-" in
                o["metadata"]["name"]]
    default = render(chart)
    assert [o for o in default if o["kind"] == "GrafanaDashboard"] == []
    assert 'grafana_dashboard="1"' in notes(chart)
    # a long release name (Helm takes 53 characters) still gives six names, not one
    long = chart.render({"dashboards": {"grafanaOperator": {"enabled": True}}},
                        name="mail-monitoring-production-eu-west-1x", namespace=NAMESPACE)
    named = [(doc["kind"], doc["metadata"]["name"]) for file, text in long.items()
             if not file.endswith("NOTES.txt")
             for doc in yaml.safe_load_all(text) if doc and "-dashboard-" in str(
                 doc.get("metadata", {}).get("name", ""))]
    assert len(set(named)) == len(named) == 12
