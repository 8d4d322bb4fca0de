"""deploy/kubernetes: the sidecar manifest is valid Kubernetes and wires spendtap in correctly."""

from __future__ import annotations

import pytest
from ruamel.yaml import YAML

from spendtap.cli.config import resolve
from tests.proc import REPO

MANIFEST = REPO / "deploy" / "kubernetes" / "spendtap-sidecar.yaml"
K8S_VERSION = "1.30.0"


def docs() -> list[dict]:
    return list(YAML(typ="safe").load_all(MANIFEST))


def by_kind(kind: str) -> dict:
    (doc,) = [d for d in docs() if d["kind"] == kind]
    return doc


def pod_spec() -> dict:
    return by_kind("Deployment")["spec"]["template"]["spec"]


def container(name: str) -> dict:
    (c,) = [c for c in pod_spec()["containers"] if c["name"] == name]
    return c


@pytest.mark.parametrize("index", range(3))
def test_schema_valid(index):
    """Each document validates against the Kubernetes OpenAPI schema (strict: no unknown fields),
    offline, with the schemas the kubernetes-validate package ships."""
    kv = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (ships the schemas)"
    )
    doc = docs()[index]
    kv.validate(doc, K8S_VERSION, strict=True)


def test_schema_check_has_teeth():
    """The schema check rejects a misspelt probe field, so passing it means something."""
    kv = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate (ships the schemas)"
    )
    doc = by_kind("Deployment")
    spendtap = [c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == "spendtap"]
    spendtap[0]["livenessProbe"]["httpGett"] = spendtap[0]["livenessProbe"].pop("httpGet")
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, K8S_VERSION, strict=True)


def test_pod_has_inference_and_spendtap():
    """Two containers in one pod; the inference server listens on the pod's loopback only."""
    names = [c["name"] for c in pod_spec()["containers"]]
    assert names == ["inference", "spendtap"]
    assert "--host=127.0.0.1" in container("inference")["args"]
    assert "--port=8000" in container("inference")["args"]


def test_spendtap_settings_are_valid_and_point_at_the_inference_container():
    """The SPENDTAP_* env resolves (as `spendtap run` would) to reverse mode to 127.0.0.1:8000."""
    env = {e["name"]: e.get("value", "from-field") for e in container("spendtap")["env"]}
    env["SPENDTAP_CENTRAL"] = "postgresql://spendtap:pw@pg.internal:5432/spendtap"  # the Secret
    settings = resolve({}, env, None)
    assert settings.mode == "reverse"
    assert settings.upstream == "http://127.0.0.1:8000"
    assert settings.listen == "0.0.0.0:8080"
    assert settings.metrics == "0.0.0.0:9464"
    # The trust choice: a gateway secret from a Secret volume, never a literal value.
    secret_file = settings.set["spendtap_gateway_secret_file"]
    (mount,) = [
        m
        for m in container("spendtap")["volumeMounts"]
        if secret_file.startswith(m["mountPath"] + "/")
    ]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod_spec()["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"]
    node = next(e for e in container("spendtap")["env"] if e["name"] == "SPENDTAP_NODE")
    assert node["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_central_store_url_comes_from_a_secret():
    """The fleet's PostgreSQL URL (it holds a password) comes from a Secret, never a literal."""
    (central,) = [e for e in container("spendtap")["env"] if e["name"] == "SPENDTAP_CENTRAL"]
    assert "value" not in central
    ref = central["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "spendtap-central" and ref["key"] == "url"


def test_ledger_on_a_volume():
    """The ledger path is inside a mount backed by the PVC, so it survives restarts."""
    spendtap = container("spendtap")
    db = next(e["value"] for e in spendtap["env"] if e["name"] == "SPENDTAP_DB")
    (mount,) = [m for m in spendtap["volumeMounts"] if db.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod_spec()["volumes"] if v["name"] == mount["name"]]
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert by_kind("PersistentVolumeClaim")["metadata"]["name"] == claim
    assert by_kind("Deployment")["spec"]["strategy"]["type"] == "Recreate"


def test_ports_probes_resources():
    """Metrics port named "metrics" on 9464; both probes GET /healthz on it; resources are set."""
    spendtap = container("spendtap")
    ports = {p["name"]: p["containerPort"] for p in spendtap["ports"]}
    assert ports == {"http": 8080, "metrics": 9464}
    for probe in ("livenessProbe", "readinessProbe"):
        assert spendtap[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    for c in pod_spec()["containers"]:
        assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
    sc = spendtap["securityContext"]
    assert sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"]
    assert sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]


def test_service_sends_clients_through_spendtap():
    """The Service's client port targets spendtap's port, never the inference container's."""
    service = by_kind("Service")
    targets = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert targets["http"] == "http"
    assert service["spec"]["selector"] == pod_labels()


def pod_labels() -> dict:
    return by_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
