"""deploy/: the Kubernetes manifests and the Grafana dashboard.

- Every manifest in deploy/k8s validates offline against the Kubernetes JSON schemas
  (kubernetes-validate, strict: unknown fields are errors). KEDA's ScaledObject is a CRD those
  schemas do not have, so its fields are checked here against the CRD's required fields, and its
  nested HPA behavior against the Kubernetes schema.
- The manifests agree with each other and with thrifty's CLI: the container args parse with
  `thrifty`'s own parser, probes hit /health on the served port, the grace period outlasts the
  drain, the Services select the pods, the router finds them through the headless Service.
- The PromQL of the KEDA ScaledObject, of prometheus-adapter's rules (templates filled as the
  adapter fills them) and of every dashboard panel is evaluated by a real Prometheus (Debian's
  package, scripts/install_prometheus.sh) scraping a real `thrifty serve` under a burst of requests.
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest
import yaml
from conftest import Server, free_port
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "thrifty.json"
METRICS_SOURCE = ROOT / "thrifty" / "engine" / "metrics.py"
DOCS = ROOT / "docs" / "kubernetes.md"
KUBERNETES_VERSION = "1.30"  # the oldest Kubernetes the manifests are meant for (HPA v2, PDB v1)
# Kinds the Kubernetes schemas do not have, checked by hand below.
NOT_IN_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"), ("kustomize.config.k8s.io/v1beta1", "Kustomization")}
METRIC_NAME = re.compile(r"\b(?:vllm|thrifty):[A-Za-z0-9_:]+")


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def one(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def cli_args(deployment: dict):
    """The container's args through thrifty's own CLI parser: a misspelt flag fails here."""
    from thrifty.entrypoints.cli import build_parser

    return build_parser().parse_args([str(a) for a in container(deployment)["args"]])


def port_number(c: dict, port) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port in named, f"port {port!r} is not one of the container's ports {named}"
    return named[port]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_targets() -> list[tuple[dict, dict]]:
    return [(p, t) for p in dashboard()["panels"] for t in p.get("targets", [])]


def keda_queries() -> dict[str, str]:
    return {t["name"]: t["metadata"]["query"] for t in one("ScaledObject")["spec"]["triggers"]}


def adapter_rules() -> list[dict]:
    return yaml.safe_load(one("ConfigMap", "thrifty-adapter-rules")["data"]["config.yaml"])["externalRules"]


def adapter_query(rule: dict, namespace: str, selector: dict[str, str]) -> str:
    """The query prometheus-adapter sends for an external metric: the rule's metricsQuery template
    with <<.Series>> the series name, <<.LabelMatchers>> the HPA's selector labels (sorted by name)
    then namespace="<the HPA's namespace>", and <<.GroupBy>> empty (external metrics group by nothing)."""
    series = re.fullmatch(r"([A-Za-z_:][A-Za-z0-9_:]*)\{.*\}", rule["seriesQuery"]).group(1)
    matchers = [f'{k}="{v}"' for k, v in sorted(selector.items())] + [f'namespace="{namespace}"']
    query = rule["metricsQuery"]
    for field, value in (("Series", series), ("LabelMatchers", ",".join(matchers)), ("GroupBy", "")):
        query = re.sub(r"<<\s*\." + field + r"\s*>>", value, query)
    assert "<<" not in query, query
    return query


def hpa_adapter_queries() -> dict[str, str]:
    """HPA metric name -> the query the adapter would run for it."""
    hpa = one("HorizontalPodAutoscaler")
    rules = {r["name"]["as"]: r for r in adapter_rules()}
    out = {}
    for m in hpa["spec"]["metrics"]:
        metric = m["external"]["metric"]
        out[metric["name"]] = adapter_query(rules[metric["name"]], hpa["metadata"]["namespace"],
                                            metric["selector"]["matchLabels"])
    return out


# ---- the schemas -------------------------------------------------------------------------------

def test_manifests_validate_against_kubernetes_schemas():
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    docs = documents()
    kinds = sorted({d["kind"] for _, d in docs})
    assert kinds == sorted({"Namespace", "Deployment", "PodDisruptionBudget", "Service", "ScaledObject",
                            "HorizontalPodAutoscaler", "ConfigMap", "Kustomization"}), kinds
    for name, doc in docs:
        if (doc["apiVersion"], doc["kind"]) in NOT_IN_SCHEMAS:
            # kubernetes-validate has no schema for a CRD: it raises (its CLI only warns), so
            # these are checked by hand in the tests below.
            with pytest.raises(SchemaNotFoundError):
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            continue
        for version in (KUBERNETES_VERSION, kubernetes_validate.latest_version()):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} against {version}: "
                            f"{'.'.join(map(str, e.path))}: {e.message}")


def test_strict_validation_catches_a_misspelt_field():
    """The validation above is worth something: strict mode rejects what Kubernetes would drop."""
    import kubernetes_validate

    bad = copy.deepcopy(one("Deployment", "thrifty"))
    container(bad)["readinesProbe"] = container(bad).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


SCALED_OBJECT_SPEC = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                      "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "advanced", "triggers", "fallback"}
TRIGGER_FIELDS = {"type", "name", "metadata", "metricType", "authenticationRef", "useCachedMetrics"}


def test_keda_scaled_object_fields():
    """KEDA's ScaledObject (keda.sh/v1alpha1) by its CRD: spec.scaleTargetRef.name and spec.triggers
    (each with type and string-valued metadata) are required; the prometheus scaler needs
    serverAddress, query and threshold; unknown fields are errors here as in strict mode."""
    import kubernetes_validate

    so = one("ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["metadata"]["name"] and so["metadata"]["namespace"]
    spec = so["spec"]
    assert set(spec) <= SCALED_OBJECT_SPEC, set(spec) - SCALED_OBJECT_SPEC
    ref = spec["scaleTargetRef"]
    assert set(ref) <= {"apiVersion", "kind", "name", "envSourceContainerName"}
    assert isinstance(ref["name"], str) and ref["name"]
    for key in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
        assert isinstance(spec[key], int) and not isinstance(spec[key], bool) and spec[key] >= 0, key
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["triggers"], "a ScaledObject needs at least one trigger"
    for trig in spec["triggers"]:
        assert set(trig) <= TRIGGER_FIELDS, set(trig) - TRIGGER_FIELDS
        assert trig["type"] == "prometheus"
        assert trig.get("metricType", "AverageValue") in ("AverageValue", "Value", "Utilization")
        meta = trig["metadata"]
        assert all(isinstance(v, str) for v in meta.values()), "trigger metadata values are strings in the CRD"
        assert {"serverAddress", "query", "threshold"} <= set(meta)
        assert re.match(r"https?://", meta["serverAddress"])
        assert float(meta["threshold"]) > 0
        assert float(meta.get("activationThreshold", "0")) >= 0
    assert len({t["name"] for t in spec["triggers"]}) == len(spec["triggers"])
    # The HPA settings KEDA passes through are Kubernetes' own type: validate them with its schema.
    advanced = spec["advanced"]
    assert set(advanced) <= {"horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount", "scalingModifiers"}
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
           "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 1,
                    "behavior": advanced["horizontalPodAutoscalerConfig"]["behavior"]}}
    kubernetes_validate.validate(hpa, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_the_base_and_no_autoscaler():
    k = one("Kustomization")
    assert set(k) == {"apiVersion", "kind", "resources"}
    for res in k["resources"]:
        assert (K8S / res).is_file(), res
    assert not [r for r in k["resources"] if r.startswith("autoscaling")], "the autoscaler is applied on its own"
    base = {name for name, _ in documents()} - {"kustomization.yaml"}
    assert set(k["resources"]) == {n for n in base if not n.startswith("autoscaling")}


# ---- the manifests agree with each other and with thrifty ---------------------------------------

def test_engine_deployment_contract():
    dep = one("Deployment", "thrifty")
    pod = dep["spec"]["template"]
    c = container(dep)
    args = cli_args(dep)
    assert args.command == "serve" and args.host == "0.0.0.0"
    assert port_number(c, "http") == args.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health" and port_number(c, get["port"]) == args.port, probe
    # The grace period outlasts the preStop sleep plus the server's own drain.
    sleep = c["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(sleep[1]) + args.shutdown_timeout
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), kind
    # One thread per CPU it is given.
    assert args.num_threads == int(c["resources"]["limits"]["cpu"])
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
    assert int(ann["prometheus.io/port"]) == args.port
    assert args.served_model_name and args.price_per_hour > 0
    assert "replicas" not in dep["spec"], "the autoscaler owns the replica count"
    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_services_select_the_engine_pods():
    dep = one("Deployment", "thrifty")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    args = cli_args(dep)
    for name in ("thrifty", "thrifty-headless"):
        svc = one("Service", name)
        assert svc["metadata"]["namespace"] == dep["metadata"]["namespace"]
        assert svc["spec"]["selector"].items() <= labels.items(), name
        (port,) = svc["spec"]["ports"]
        assert port_number(container(dep), port["targetPort"]) == args.port
    headless = one("Service", "thrifty-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses", False)


def test_router_finds_the_engines_through_the_headless_service():
    router = one("Deployment", "thrifty-router")
    c = container(router)
    args = cli_args(router)
    assert args.command == "router" and args.host == "0.0.0.0" and args.policy == "prefix_aware"
    assert port_number(c, "http") == args.port
    headless = one("Service", "thrifty-headless")
    (url,) = args.backend_dns
    host_port = re.fullmatch(r"http://([a-z0-9.-]+):(\d+)", url)
    assert host_port, url
    assert host_port.group(1).split(".")[0] == headless["metadata"]["name"]
    assert int(host_port.group(2)) == headless["spec"]["ports"][0]["port"]
    assert router["metadata"]["namespace"] == headless["metadata"]["namespace"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health" and port_number(c, c[probe]["httpGet"]["port"]) == args.port
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind]), kind
    svc = one("Service", "thrifty-router")
    assert svc["spec"]["selector"].items() <= router["spec"]["template"]["metadata"]["labels"].items()
    assert port_number(c, svc["spec"]["ports"][0]["targetPort"]) == args.port


def test_autoscalers_agree():
    """KEDA and the HPA alternative scale the engine Deployment on the same signals, thresholds and
    bounds, and their queries name the served model and the namespace."""
    dep = one("Deployment", "thrifty")
    args = cli_args(dep)
    (model,) = args.served_model_name
    ns = dep["metadata"]["namespace"]
    so, hpa = one("ScaledObject"), one("HorizontalPodAutoscaler")
    for obj in (so, hpa):
        assert obj["metadata"]["namespace"] == ns
        ref = obj["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == \
        (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])
    assert so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"] == hpa["spec"]["behavior"]
    keda = {t["name"]: t for t in so["spec"]["triggers"]}
    assert "sum(vllm:num_requests_waiting{" in keda["waiting"]["metadata"]["query"]
    for q in keda_queries().values():
        assert f'model_name="{model}"' in q and f'namespace="{ns}"' in q, q
    targets = {m["external"]["metric"]["name"]: m["external"]["target"] for m in hpa["spec"]["metrics"]}
    assert targets.keys() == {"thrifty_requests_waiting", "thrifty_requests_in_flight"}
    for hpa_name, keda_name in (("thrifty_requests_waiting", "waiting"), ("thrifty_requests_in_flight", "in-flight")):
        assert targets[hpa_name]["type"] == keda[keda_name].get("metricType") == "AverageValue"
        assert float(targets[hpa_name]["averageValue"]) == float(keda[keda_name]["metadata"]["threshold"])
    # In flight per replica = the concurrency a pod runs at most.
    assert float(keda["in-flight"]["metadata"]["threshold"]) == args.max_num_seqs
    for m in hpa["spec"]["metrics"]:
        assert m["external"]["metric"]["selector"]["matchLabels"] == {"model_name": model}
    # The adapter publishes what the HPA asks for, and fills in the same query as KEDA's.
    assert {r["name"]["as"] for r in adapter_rules()} == targets.keys()
    for r in adapter_rules():
        assert re.fullmatch(r["name"]["matches"], r["seriesQuery"].split("{")[0])
        assert r["resources"]["overrides"]["namespace"] == {"resource": "namespace"}
    filled = hpa_adapter_queries()
    assert filled["thrifty_requests_waiting"] == \
        f'sum(vllm:num_requests_waiting{{model_name="{model}",namespace="{ns}"}}) by ()'


# ---- the dashboard -----------------------------------------------------------------------------

def test_dashboard_structure():
    d = dashboard()
    assert d["schemaVersion"] >= 36 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["model_name"]["type"] == "query"
    assert "model_name" in variables["model_name"]["query"]["query"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in d["panels"]}
    # vLLM's standard panels and thrifty's cost panels.
    for title in ("Requests running and waiting", "KV cache usage", "Time to first token", "Inter-token latency",
                  "End-to-end request latency", "Token throughput", "Prefix cache hit rate", "Preemptions",
                  "$ per 1M tokens", "Idle cost in range", "Busy ratio", "Cost by API key in range"):
        assert title in titles, title
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"], p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
    for p, t in dashboard_targets():
        assert t["refId"] and t["expr"], p["title"]
        assert 'model_name="$model_name"' in t["expr"], (p["title"], t["expr"])


def test_every_metric_name_is_one_thrifty_defines():
    """Every vllm:/thrifty: name in the dashboard and the autoscalers' queries is defined in
    thrifty/engine/metrics.py (the live server's exposition is checked in the slow test)."""
    source = METRICS_SOURCE.read_text()
    exprs = [t["expr"] for _, t in dashboard_targets()] + list(keda_queries().values()) + \
        list(hpa_adapter_queries().values())
    names = {n for e in exprs for n in METRIC_NAME.findall(e)}
    assert len(names) > 20
    for name in names:
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        candidates = {name, base, re.sub(r"_total$", "", base)}
        assert any(f'"{c}"' in source for c in candidates), name


# ---- a real Prometheus scraping a real server --------------------------------------------------

SCRAPE_S = 1.0
RATE_INTERVAL = f"{int(max(SCRAPE_S + SCRAPE_S, 4 * SCRAPE_S))}s"  # Grafana's $__rate_interval at step = scrape
KEY_NAME, KEY = "team-a", "sk-team-a"
BURST = 8  # concurrent completions against --max-num-seqs 1: seven of them queue
MAX_TOKENS = 128  # with BURST, long enough for several scrapes to see the queue on a fast CPU


class Prometheus:
    """Debian's Prometheus on a free loopback port with a temporary config and TSDB, running one
    scrape job every second."""

    def __init__(self, tmp: Path, job: dict):
        binary = shutil.which("prometheus")
        assert binary, "Prometheus is not installed: run `bash scripts/install_prometheus.sh` (make test does)"
        config = {"global": {"scrape_interval": f"{SCRAPE_S:g}s", "scrape_timeout": f"{SCRAPE_S:g}s",
                             "evaluation_interval": f"{SCRAPE_S:g}s"},
                  "scrape_configs": [job]}
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = tmp / "prometheus.log"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready: {self.log_path.read_text()}")
            time.sleep(0.2)

    def _api(self, path: str, **params) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (params.get("query"), body)
        return body["data"]["result"]

    def query(self, expr: str, at: float) -> list[dict]:
        return self._api("query", query=expr, time=f"{at:.3f}")

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self._api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=str(step))

    def scalar(self, expr: str, at: float) -> float | None:
        """The value of a query that aggregates to one series (None: no series)."""
        result = self.query(expr, at)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def documented_scrape_job() -> dict:
    """The Kubernetes scrape job docs/kubernetes.md tells users to run."""
    text = DOCS.read_text()
    block = re.search(r"<!-- scrape-job -->\s*```yaml\n(.*?)```", text, re.S)
    assert block, "docs/kubernetes.md has no scrape job block"
    (job,) = yaml.safe_load(block.group(1))["scrape_configs"]
    return job


def as_discovered_pod(job: dict, pod: dict, namespace: str, name: str, ip: str, port: int) -> dict:
    """The scrape job with Kubernetes pod discovery replaced by one static target that carries the
    __meta_kubernetes_* labels discovery would give this pod (Debian's Prometheus is built without
    Kubernetes discovery), so that the job's relabelling runs as it would in a cluster. The port
    annotation is the one a live server listens on here."""
    job = copy.deepcopy(job)
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    job["scrape_interval"] = f"{SCRAPE_S:g}s"
    meta = {"__meta_kubernetes_pod_annotation_" + re.sub(r"[^A-Za-z0-9_]", "_", k): str(v)
            for k, v in pod["metadata"]["annotations"].items()}
    assert meta["__meta_kubernetes_pod_annotation_prometheus_io_port"] == str(
        port_number(pod["spec"]["containers"][0], "http"))
    meta["__meta_kubernetes_pod_annotation_prometheus_io_port"] = str(port)
    meta.update({"__meta_kubernetes_pod_ip": ip, "__meta_kubernetes_namespace": namespace,
                 "__meta_kubernetes_pod_name": name})
    # The address is what discovery would put before relabelling: not where the server is.
    job["static_configs"] = [{"targets": ["discovered-pod.invalid:1"], "labels": meta}]
    return job


def grafana_expr(expr: str, namespace: str, model: str, range_s: int) -> str:
    """A panel's expr as Grafana sends it: template variables substituted."""
    out = (expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__range", f"{range_s}s")
           .replace("$__interval", f"{int(SCRAPE_S)}s").replace("$namespace", namespace)
           .replace("$model_name", model))
    assert "$" not in out, out
    return out


def finite_values(result: list[dict]) -> list[float]:
    values = [float(v) for s in result for _, v in s.get("values", [s.get("value", (0, "NaN"))])]
    return [v for v in values if math.isfinite(v)]


@pytest.mark.slow
def test_promql_against_live_server(tmp_path):
    """The ScaledObject's and the adapter's queries and every dashboard expr, read from the files,
    evaluated by a real Prometheus scraping a real `thrifty serve` while a burst of requests queues
    behind --max-num-seqs 1."""
    dep = one("Deployment", "thrifty")
    (model,) = cli_args(dep).served_model_name
    namespace = dep["metadata"]["namespace"]
    keda = keda_queries()
    adapter = hpa_adapter_queries()
    targets = dashboard_targets()
    load_panel = next(p for p in dashboard()["panels"] if p["title"] == "Requests running and waiting")
    running_expr = grafana_expr(next(t["expr"] for t in load_panel["targets"] if t["legendFormat"] == "running"),
                                namespace, model, 60)

    server = Server("--served-model-name", model, "--max-num-seqs", "1", "--price-per-hour", "3600",
                    "--api-key", f"{KEY_NAME}={KEY}")
    prom = None
    rc = None
    try:
        job = as_discovered_pod(documented_scrape_job(), dep["spec"]["template"], namespace, "thrifty-test-0",
                                "127.0.0.1", server.port)
        prom = Prometheus(tmp_path, job)
        deadline = time.monotonic() + 20
        while prom.scalar(keda["waiting"], time.time()) is None:  # first scrapes in
            assert time.monotonic() < deadline, "Prometheus never scraped the server"
            time.sleep(0.2)
        # The relabelling gave the series the pod's namespace and name, at the address it built.
        (up,) = prom.query("up", time.time())
        assert up["metric"] == {"__name__": "up", "job": job["job_name"], "instance": f"127.0.0.1:{server.port}",
                                "namespace": namespace, "pod": "thrifty-test-0"}, up
        now = time.time()
        assert prom.scalar(keda["waiting"], now) == 0 and prom.scalar(running_expr, now) == 0

        def complete(i: int) -> dict:
            r = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                           json={"model": model, "prompt": f"Request {i}: list the planets of the solar system.",
                                 "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0})
            r.raise_for_status()
            return r.json()

        samples = []  # (waiting, running, in flight, adapter waiting, adapter in flight), each at one instant
        load_start = time.time()
        with ThreadPoolExecutor(BURST) as pool:
            futures = [pool.submit(complete, i) for i in range(BURST)]
            while not all(f.done() for f in futures):
                at = time.time()
                samples.append((prom.scalar(keda["waiting"], at), prom.scalar(running_expr, at),
                                prom.scalar(keda["in-flight"], at), prom.scalar(adapter["thrifty_requests_waiting"], at),
                                prom.scalar(adapter["thrifty_requests_in_flight"], at)))
                time.sleep(0.25)
            responses = [f.result() for f in futures]
        assert all(r["usage"]["completion_tokens"] == MAX_TOKENS and r["usage"]["cost_usd"] > 0 for r in responses)

        # Under the burst: requests wait, one runs, and every form of the query agrees at each instant.
        assert max(s[0] for s in samples) > 0, samples
        assert all(s[1] <= 1 for s in samples), samples
        assert any(s[0] > 0 and s[1] == 1 for s in samples), samples
        for waiting, running, in_flight, a_waiting, a_in_flight in samples:
            assert in_flight == waiting + running
            assert (a_waiting, a_in_flight) == (waiting, in_flight)
        threshold = float(one("ScaledObject")["spec"]["triggers"][0]["metadata"].get("activationThreshold", "0"))
        assert max(s[0] for s in samples) > threshold  # KEDA would report the trigger active

        # Drained: nothing waits, nothing runs.
        deadline = time.monotonic() + 15
        while True:
            at = time.time()
            drained = (prom.scalar(keda["waiting"], at), prom.scalar(running_expr, at),
                       prom.scalar(keda["in-flight"], at), prom.scalar(adapter["thrifty_requests_waiting"], at))
            if drained == (0, 0, 0, 0):
                break
            assert time.monotonic() < deadline, f"not drained: {drained}"
            time.sleep(0.25)
        end = time.time()

        # Every name the dashboard and the autoscalers use is in the live server's exposition.
        exposed = {s.name for fam in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)
                   for s in fam.samples}
        used = {n for e in [t["expr"] for _, t in targets] + list(keda.values()) + list(adapter.values())
                for n in METRIC_NAME.findall(e)}
        assert used <= exposed, used - exposed

        # Every dashboard expr evaluates (as a range over the load for time series, at the end
        # over the whole window for instant panels) and gives numbers.
        range_s = math.ceil(end - load_start) + 2
        results = {}
        for panel, target in targets:
            expr = grafana_expr(target["expr"], namespace, model, range_s)
            if target.get("instant"):
                result = prom.query(expr, end)
            else:
                result = prom.query_range(expr, load_start, end)
            assert finite_values(result), f"{panel['title']} / {target['legendFormat']}: {expr} -> {result}"
            results[(panel["title"], target["legendFormat"])] = result
        # The cost panels show what the server charged.
        assert max(finite_values(results[("$ per 1M tokens", "{{instance}}")])) > 0
        assert max(finite_values(results[("$ per 1M tokens", "fleet")])) > 0
        assert max(finite_values(results[("Busy ratio", "{{instance}}")])) > 0
        assert max(finite_values(results[("Spend rate", "busy $/h")])) > 0
        assert finite_values(results[("Spend rate", "paid $/h")])[-1] == 3600
        (by_key,) = results[("Cost by API key in range", "{{key_name}}")]
        assert by_key["metric"] == {"key_name": KEY_NAME} and float(by_key["value"][1]) > 0
        assert max(finite_values(results[("Requests running and waiting", "waiting")])) > 0
        assert max(finite_values(results[("Time to first token", "p99")])) > 0
    finally:
        if prom is not None:
            prom.stop()
        rc = server.stop()
    assert rc == 0
