"""deploy/helm/visionstream, checked offline (no cluster, no helm binary): rendered for each values
file with Helm's own Go SDK (helm-python-sdk), every built-in object against Kubernetes' schemas
(kubernetes-validate, strict), every custom resource against its CRD vendored in deploy/crds,
and the traps of a chart like this one, each rule shown to catch what it names."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is in the test extra")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "visionstream"
CRDS = REPO / "deploy" / "crds"
VALUES_FILES = sorted((CHART / "ci").glob("*.yaml"))
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")  # Chart.yaml's kubeVersion floor, and the newest schemas we have
SERVED = set(re.findall(r'@app\.page\("([^"]+)"\)', (REPO / "streams" / "service" / "routes.py").read_text()))


TLS_SECRET = {"dask": {"tls": {"secretName": "vs-dask-tls"}}}  # what a user names for dask.tls, on by default


def with_tls_secret(values: dict[str, Any] | None) -> dict[str, Any]:
    """``values`` with a Secret for dask.tls where they name none (the defaults need one)."""
    values = copy.deepcopy(values or {})
    dask = values.setdefault("dask", {})
    dask.setdefault("tls", {}).setdefault("secretName", TLS_SECRET["dask"]["tls"]["secretName"])
    return values


def render(values: dict[str, Any] | None = None, *, as_given: bool = False) -> list[dict[str, Any]]:
    """The chart's objects for ``values`` (a dask.tls Secret named unless ``as_given``)."""
    chart = helm.Chart.load(str(CHART))
    manifests = chart.render(values or {} if as_given else with_tls_secret(values), name="vs", namespace="vision", is_install=True)
    return [doc for path, text in sorted(manifests.items()) if path.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc]


def values_of(path: Path | None) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) if path else {}


def closed(schema: Any) -> Any:
    """A CRD's openAPIV3Schema as the API server's strict field validation applies it: an object
    that lists its properties takes no others, unless it preserves unknown fields."""
    if isinstance(schema, dict):
        schema = {key: closed(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    return schema


def crd_validators() -> dict[tuple[str, str], jsonschema.Draft7Validator]:
    validators = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    schema = closed(version["schema"]["openAPIV3Schema"])
                    schema["properties"]["metadata"] = {"type": "object"}  # the API server's own, on every object
                    schema["properties"]["apiVersion"] = {"const": f"{group}/{version['name']}"}
                    schema["properties"]["kind"] = {"const": kind}
                    validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return validators


CRD_VALIDATORS = crd_validators()


# --- the traps, as rules over rendered objects: each returns what is wrong -----------------------

def keda_metadata_not_strings(docs: list[dict[str, Any]]) -> list[str]:
    return [
        f"ScaledObject trigger metadata {key}={value!r} is not a string"
        for doc in docs if doc["kind"] == "ScaledObject"
        for trigger in doc["spec"]["triggers"] for key, value in trigger["metadata"].items() if not isinstance(value, str)
    ]


def keda_topic_unset(docs: list[dict[str, Any]]) -> list[str]:
    return [
        "a Kafka trigger without a topic scales on every topic of the group"
        for doc in docs if doc["kind"] == "ScaledObject"
        for trigger in doc["spec"]["triggers"] if trigger["type"] == "kafka" and not trigger["metadata"].get("topic")
    ]


def replicas_above_partitions(docs: list[dict[str, Any]]) -> list[str]:
    [config_map] = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    partitions = (yaml.safe_load(config_map["data"]["visionstream.yaml"]).get("topics") or {}).get("partitions", 4)
    return [
        f"maxReplicaCount {doc['spec']['maxReplicaCount']} is above the {partitions} input partitions"
        for doc in docs if doc["kind"] == "ScaledObject" and doc["spec"]["maxReplicaCount"] > partitions
    ]


def probes_not_served(docs: list[dict[str, Any]]) -> list[str]:
    problems = []
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                path = ((container.get(probe) or {}).get("httpGet") or {}).get("path")
                if path is not None and path not in SERVED:
                    problems.append(f"{probe} {path} is not served (the service serves {sorted(SERVED)})")
    return problems


def grace_shorter_than_drain(docs: list[dict[str, Any]]) -> list[str]:
    [config_map] = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    drain = (yaml.safe_load(config_map["data"]["visionstream.yaml"]).get("worker") or {}).get("shutdown_grace_s", 30.0)
    needed = math.ceil(drain) + 20  # then the commit and the producer's flush
    return [
        f"terminationGracePeriodSeconds {doc['spec']['template']['spec'].get('terminationGracePeriodSeconds', 30)} < the drain {drain} s + 20 s"
        for doc in docs if doc["kind"] == "Deployment" and doc["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30) < needed
    ]


RULES = (keda_metadata_not_strings, keda_topic_unset, replicas_above_partitions, probes_not_served, grace_shorter_than_drain)


# --- every values file -------------------------------------------------------------------------

@pytest.mark.parametrize("values_file", [None, *VALUES_FILES], ids=lambda p: p.stem if p else "defaults")
def test_the_chart_renders_valid_objects_and_falls_into_no_trap(values_file):
    docs = render(values_of(values_file))
    assert {doc["kind"] for doc in docs} >= {"ConfigMap", "Deployment", "Service"}
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        validator = CRD_VALIDATORS.get((doc["apiVersion"], doc["kind"]))
        if validator is not None:
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
            assert not errors, (name, errors)
        else:
            assert "." not in doc["apiVersion"].split("/")[0] or doc["apiVersion"].split("/")[0].endswith("k8s.io"), f"{name}: a custom resource without a vendored CRD"
            for version in KUBERNETES_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
    for rule in RULES:
        assert rule(docs) == [], rule.__name__
    assert not any(doc["kind"] == "Secret" for doc in docs)  # secrets are the user's, never the chart's


@pytest.mark.parametrize("values_file", [None, *VALUES_FILES], ids=lambda p: p.stem if p else "defaults")
def test_helm_lint_is_clean(values_file):
    report = helm.lint(str(CHART), with_tls_secret(values_of(values_file)), strict=True)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_each_trap_rule_catches_what_it_names():
    docs = render(values_of(CHART / "ci" / "gpu-values.yaml"))

    def broken(change) -> list[dict[str, Any]]:
        copied = copy.deepcopy(docs)
        change(copied)
        return copied

    def of(kind: str, found: list[dict[str, Any]]) -> dict[str, Any]:
        return next(doc for doc in found if doc["kind"] == kind)

    def number_threshold(found):
        of("ScaledObject", found)["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 120

    def no_topic(found):
        del of("ScaledObject", found)["spec"]["triggers"][0]["metadata"]["topic"]

    def too_many(found):
        of("ScaledObject", found)["spec"]["maxReplicaCount"] = 9

    def wrong_probe(found):
        of("Deployment", found)["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"] = "/healthz"

    def short_grace(found):
        of("Deployment", found)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30

    for rule, change in zip(RULES, (number_threshold, no_topic, too_many, wrong_probe, short_grace), strict=True):
        assert rule(broken(change)), rule.__name__


# --- what the objects say ----------------------------------------------------------------------

def test_the_stream_worker_is_probed_drained_and_locked_down():
    docs = render()
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez" and container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["terminationGracePeriodSeconds"] == 30 + 30  # the drain, then the commit and the flush
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"] and not container["securityContext"]["allowPrivilegeEscalation"]
    env = {item["name"]: item for item in container["env"]}
    assert env["VISIONSTREAM_CLUSTER__SCHEDULER"]["value"] == "tls://vs-visionstream-dask-scheduler.vision.svc:8786"  # dask.tls
    assert "replicas" not in deployment["spec"]  # KEDA owns the count
    pdb = next(doc for doc in docs if doc["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # a drain never hangs while Dask is down


def test_the_lag_threshold_is_one_workers_work_in_hand_and_both_topics_trigger():
    scaled = next(doc for doc in render() if doc["kind"] == "ScaledObject")
    assert [t["metadata"]["topic"] for t in scaled["spec"]["triggers"]] == ["image-uploads", "image-uploads-backfill"]
    assert {t["metadata"]["lagThreshold"] for t in scaled["spec"]["triggers"]} == {"120"}  # 60 x max(2, 0)
    assert scaled["spec"]["minReplicaCount"] == 1 and scaled["spec"]["maxReplicaCount"] == 8
    wider = next(doc for doc in render({"config": {"batch": {"size": 32, "max_in_flight": 5}}}) if doc["kind"] == "ScaledObject")
    assert wider["spec"]["triggers"][0]["metadata"]["lagThreshold"] == "160"


def test_secrets_come_from_existing_secrets_for_the_worker_keda_and_dask():
    docs = render(values_of(CHART / "ci" / "gpu-values.yaml"))
    auth = next(doc for doc in docs if doc["kind"] == "TriggerAuthentication")
    assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} == {"username", "password", "ca"}
    scaled = next(doc for doc in docs if doc["kind"] == "ScaledObject")
    assert {t["metadata"]["sasl"] for t in scaled["spec"]["triggers"]} == {"scram_sha512"}
    assert {t["metadata"]["tls"] for t in scaled["spec"]["triggers"]} == {"enable"}
    cluster = next(doc for doc in docs if doc["kind"] == "DaskCluster")
    [worker] = cluster["spec"]["worker"]["spec"]["containers"]
    worker_env = {item["name"]: item for item in worker["env"]}
    assert worker_env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-visionstream"
    assert worker_env["VISIONSTREAM_LOCAL_WORKERS"]["value"] == "1" and "--nworkers" not in worker["args"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    [scheduler] = cluster["spec"]["scheduler"]["spec"]["containers"]
    assert not [item["name"] for item in scheduler.get("env", []) if item["name"].startswith(("AWS_", "VISIONSTREAM_"))]  # no storage credentials: it runs no task
    assert "secretKeyRef" not in str(scheduler)


def test_an_existing_scheduler_replaces_the_dask_cluster():
    docs = render({"dask": {"scheduler": "tls://gateway.dask:8786"}})
    assert not any(doc["apiVersion"].startswith("kubernetes.dask.org") for doc in docs)
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    env = {item["name"]: item for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["VISIONSTREAM_CLUSTER__SCHEDULER"]["value"] == "tls://gateway.dask:8786"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"autoscaling": {"maxReplicas": "eight"}}, "maxReplicas"),
        ({"autoscaling": {"maxReplicas": 12}}, "autoscaling.maxReplicas (12) is above config.topics.partitions (8)"),
        ({"config": {"kafka": {"sasl_password": "hunter2"}}}, "kafka"),
        ({"config": {"storage": {"secret_access_key": "x"}}}, "storage"),
        ({"streamWorker": {"port": 80}}, "port"),
        ({"dask": {"scheduler": "scheduler:8786"}}, "scheduler"),
        ({"dask": {"gpu": {"enabled": False}}}, "no Dask worker would run the model"),
        ({"config": {"kafka": {"security_protocol": "SASL_SSL"}}}, "secrets.kafka.name"),
        ({"autoscalling": {"enabled": False}}, "autoscalling"),
        ({"dask": {"gpu": {"processesPerGpu": 4}}}, "dask.gpu.processesPerGpu must be 1"),
        ({"dask": {"cpu": {"enabled": True, "processes": 2}}}, "dask.cpu.processes must be 1"),
    ],
)
def test_a_wrong_value_fails_at_install_naming_the_field(values, named):
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    assert named in str(caught.value)


def test_tls_without_sasl_asks_the_secret_only_for_its_ca():
    docs = render({"config": {"kafka": {"security_protocol": "SSL"}}, "secrets": {"kafka": {"name": "kafka-ca", "caKey": "ca.crt"}}})
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    env = {item["name"] for item in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "VISIONSTREAM_KAFKA__SSL_CAFILE" in env and not any("SASL" in name for name in env)
    auth = next(doc for doc in docs if doc["kind"] == "TriggerAuthentication")
    assert [ref["parameter"] for ref in auth["spec"]["secretTargetRef"]] == ["ca"]


def test_network_policies_never_open_to_everyone_and_let_the_dask_operator_in():
    docs = render({"networkPolicy": {"enabled": True, "monitoringNamespaces": []}})
    policies = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "NetworkPolicy"}
    for policy in policies.values():
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), f"{policy['metadata']['name']}: a rule without sources admits every pod"
    dask = policies["vs-visionstream-dask"]
    namespaces = [peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for rule in dask["spec"]["ingress"] for peer in rule["from"] if "namespaceSelector" in peer]
    assert namespaces == ["dask-operator"]


def test_dask_workers_size_their_threads_to_the_pods_cpu_request():
    cluster = next(doc for doc in render() if doc["kind"] == "DaskCluster")
    [worker] = cluster["spec"]["worker"]["spec"]["containers"]
    cpus = next(item for item in worker["env"] if item["name"] == "VISIONSTREAM_CPUS")
    assert cpus["valueFrom"]["resourceFieldRef"] == {"containerName": "worker", "resource": "requests.cpu", "divisor": "1"}


def test_image_pull_secrets_reach_every_pod_the_chart_makes():
    """A private registry serves the Dask images too: the scheduler and every worker group get
    the secrets the stream worker gets."""
    docs = render({"imagePullSecrets": [{"name": "registry"}], "dask": {"cpu": {"enabled": True}}})
    pods = [doc["spec"]["template"]["spec"] for doc in docs if doc["kind"] == "Deployment"]
    for doc in docs:
        if doc["kind"] == "DaskCluster":
            pods += [doc["spec"]["scheduler"]["spec"], doc["spec"]["worker"]["spec"]]
        elif doc["kind"] == "DaskWorkerGroup":
            pods.append(doc["spec"]["worker"]["spec"])
    pods += [doc["spec"] for doc in docs if doc["kind"] == "Pod"]  # `helm test`'s
    assert len(pods) >= 5  # the stream worker, the scheduler, the GPU and the CPU worker groups, the test
    assert all(pod.get("imagePullSecrets") == [{"name": "registry"}] for pod in pods), pods
    assert all("imagePullSecrets" not in str(doc) for doc in render())  # none by default


def test_the_scheduler_serves_the_http_api_the_dask_operator_retires_workers_through():
    """The operator scales a group down by asking the scheduler's HTTP API which workers to
    retire (/api/v1/retire_workers); without the route it falls back to RPC, then to deleting
    the newest pods mid-task. The value is read the way Dask reads it, and keeps Dask's own
    routes (health, metrics) beside the API."""
    import dask.config
    import yaml

    import distributed

    cluster = next(doc for doc in render() if doc["kind"] == "DaskCluster")
    [scheduler] = cluster["spec"]["scheduler"]["spec"]["containers"]
    env = {item["name"]: item["value"] for item in scheduler.get("env", []) if "value" in item}
    routes = dask.config.collect_env({"DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES": env["DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES"]})
    routes = routes["distributed"]["scheduler"]["http"]["routes"]
    defaults = yaml.safe_load((Path(distributed.__file__).parent / "distributed.yaml").read_text())
    assert "distributed.http.scheduler.api" in routes
    assert set(defaults["distributed"]["scheduler"]["http"]["routes"]) <= set(routes)


@pytest.mark.parametrize("values_file", [None, CHART / "ci" / "gpu-values.yaml", CHART / "ci" / "cpu-values.yaml"])
def test_every_dask_worker_group_follows_the_operators_rule_one_process_named_after_its_pod(values_file):
    """The operator retires a worker by deleting the Deployment of the worker's name, and its
    autoscaler sets pod replicas from the scheduler's wanted workers: both hold only where each
    pod runs one worker process named DASK_WORKER_NAME (which the operator sets to the pod's
    Deployment name). `dask worker --nworkers N` would name them NAME-0..N-1: none retirable."""
    docs = render(values_of(values_file) if values_file else None)
    groups = [doc["spec"]["worker"] for doc in docs if doc["kind"] in ("DaskCluster", "DaskWorkerGroup")]
    assert groups
    for group in groups:
        [container] = group["spec"]["containers"]
        args = [arg for arg in container["args"] if not arg.startswith("tls://")]  # dask.tls: the scheduler's address first
        assert args[:4] == ["dask", "worker", "--name", "$(DASK_WORKER_NAME)"], args
        assert "--nworkers" not in args and "--nprocs" not in args, args
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env["VISIONSTREAM_LOCAL_WORKERS"] == "1"


def pods_of(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every pod spec the chart makes, by a name saying whose."""
    pods = {}
    for doc in docs:
        if doc["kind"] == "Deployment":
            pods["stream-worker"] = doc["spec"]["template"]["spec"]
        elif doc["kind"] == "DaskCluster":
            pods["scheduler"], pods["dask-worker"] = doc["spec"]["scheduler"]["spec"], doc["spec"]["worker"]["spec"]
        elif doc["kind"] == "DaskWorkerGroup":
            pods[f"dask-worker-{doc['metadata']['name']}"] = doc["spec"]["worker"]["spec"]
        elif doc["kind"] == "Pod":
            pods[f"test-{doc['metadata']['name']}"] = doc["spec"]
    return pods


def home_not_writable(docs: list[dict[str, Any]]) -> list[str]:
    """Containers on a read-only root whose HOME (and XDG cache) is not on a mounted volume:
    pip, matplotlib, torch and CUDA write under them and fail, or fall back to a shared /tmp."""
    wrong = []
    for whose, pod in pods_of(docs).items():
        for container in pod["containers"]:
            if not container.get("securityContext", {}).get("readOnlyRootFilesystem") or whose.startswith("test-"):
                continue
            env = {item["name"]: item.get("value", "") for item in container.get("env", [])}
            mounts = [mount["mountPath"] for mount in container.get("volumeMounts", []) if not mount.get("readOnly")]
            for name in ("HOME", "XDG_CACHE_HOME"):
                if not any(env.get(name, "").startswith(mount.rstrip("/") + "/") for mount in mounts):
                    wrong.append(f"{whose}/{container['name']}: {name}={env.get(name)!r} is not on a writable volume")
    return wrong


def test_every_container_on_a_read_only_root_has_a_writable_home_and_cache():
    for values_file in [None, *VALUES_FILES]:
        assert home_not_writable(render(values_of(values_file))) == [], values_file
    docs = render()
    [container] = pods_of(docs)["stream-worker"]["containers"]
    container["env"] = [item for item in container["env"] if item["name"] != "HOME"]
    assert home_not_writable(docs)  # the rule catches what it names
    worker = pods_of(render())["dask-worker"]["containers"][0]
    env = {item["name"]: item.get("value") for item in worker["env"]}
    assert env["CUDA_CACHE_PATH"].startswith("/var/cache/visionstream/") and env["VISIONSTREAM_MODEL__COMPILE_CACHE_DIR"].startswith("/var/cache/visionstream/")
    assert {"mountPath": "/var/cache/visionstream", "name": "cache"} in worker["volumeMounts"]


def test_a_service_account_option_for_the_pods_that_read_the_bucket():
    assert not any(doc["kind"] == "ServiceAccount" for doc in render())
    assert not any("serviceAccountName" in pod for pod in pods_of(render()).values())  # the namespace's default
    docs = render({"serviceAccount": {"create": True, "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}}, "dask": {"cpu": {"enabled": True}}})
    [account] = [doc for doc in docs if doc["kind"] == "ServiceAccount"]
    assert account["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/r"}
    assert account["automountServiceAccountToken"] is False
    pods = pods_of(docs)
    readers = {whose for whose in pods if whose == "stream-worker" or whose.startswith("dask-worker")}
    assert len(readers) == 3
    for whose, pod in pods.items():
        assert pod.get("serviceAccountName") == (account["metadata"]["name"] if whose in readers else None), whose
        assert pod["automountServiceAccountToken"] is False, whose
    named = pods_of(render({"serviceAccount": {"name": "existing"}}))
    assert named["stream-worker"]["serviceAccountName"] == named["dask-worker"]["serviceAccountName"] == "existing"


def test_placement_and_priority_reach_every_pod():
    docs = render(values_of(CHART / "ci" / "monitoring-values.yaml"))
    pods = pods_of(docs)
    assert pods["stream-worker"]["priorityClassName"] == "visionstream-stream" and pods["stream-worker"]["topologySpreadConstraints"]
    assert pods["dask-worker"]["priorityClassName"] == "visionstream-gpu" and pods["dask-worker"]["affinity"]["nodeAffinity"]
    assert {"name": "NCCL_DEBUG", "value": "WARN"} in pods["dask-worker"]["containers"][0]["env"]
    cluster = next(doc for doc in docs if doc["kind"] == "DaskCluster")
    assert cluster["spec"]["worker"]["metadata"]["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
    assert pods["scheduler"]["priorityClassName"] == "visionstream-gpu" and pods["scheduler"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert {"name": "DASK_LOGGING__DISTRIBUTED", "value": "info"} in pods["scheduler"]["containers"][0]["env"]
    assert cluster["spec"]["scheduler"]["metadata"]["annotations"] == {"team": "vision"}
    cpu = next(pod for whose, pod in pods.items() if whose.startswith("dask-worker-"))
    assert cpu["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"


def test_keda_scales_up_by_policy_falls_back_to_the_replicas_there_are_and_never_to_zero():
    scaled = next(doc for doc in render() if doc["kind"] == "ScaledObject")
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"] == {"stabilizationWindowSeconds": 60, "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]}
    assert scaled["spec"]["fallback"] == {"failureThreshold": 3, "replicas": 1, "behavior": "currentReplicasIfHigher"}
    assert scaled["spec"]["minReplicaCount"] == 1
    with pytest.raises(Exception, match="scaleToZero"):
        render({"autoscaling": {"scaleToZero": True}})


def test_the_lag_threshold_follows_throughput_where_given():
    def threshold(values):
        scaled = next(doc for doc in render(values) if doc["kind"] == "ScaledObject")
        return {trigger["metadata"]["lagThreshold"] for trigger in scaled["spec"]["triggers"]}

    assert threshold({}) == {"120"}  # one worker's work in hand
    assert threshold({"autoscaling": {"throughputPerReplica": 120, "acceptableDelaySeconds": 10}}) == {"1200"}
    assert threshold({"autoscaling": {"throughputPerReplica": 5, "acceptableDelaySeconds": 2.5}}) == {"120"}  # never below the work in hand
    assert threshold({"autoscaling": {"throughputPerReplica": 30.5, "acceptableDelaySeconds": 7}}) == {"214"}  # rounded up
    assert threshold({"autoscaling": {"lagThreshold": 500, "throughputPerReplica": 120, "acceptableDelaySeconds": 10}}) == {"500"}


def test_network_policies_are_on_by_default_and_let_helm_test_reach_the_stream_worker():
    docs = render()
    policies = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "NetworkPolicy"}
    assert set(policies) == {"vs-visionstream", "vs-visionstream-dask"}
    [test_pod] = [doc for doc in docs if doc["kind"] == "Pod"]
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert "http://vs-visionstream:6066/readyz" in test_pod["spec"]["containers"][0]["command"][-1]
    allowed = [source for rule in policies["vs-visionstream"]["spec"]["ingress"] for source in rule["from"]]
    labels = test_pod["metadata"]["labels"]
    assert any(set(source.get("podSelector", {}).get("matchLabels", {}).items()) <= set(labels.items()) and "podSelector" in source for source in allowed)
    assert all(source for source in allowed)  # never an empty selector: that would let everyone in


def test_alerts_read_series_the_stream_worker_exports_and_the_dask_pods_are_scraped():
    docs = render(values_of(CHART / "ci" / "monitoring-values.yaml"))
    [rule] = [doc for doc in docs if doc["kind"] == "PrometheusRule"]
    exported = set(re.findall(r'"(visionstream_[a-z_]+)"', (REPO / "streams" / "service" / "metrics.py").read_text()))
    alerts = rule["spec"]["groups"][0]["rules"]
    assert {alert["alert"] for alert in alerts} == {"VisionstreamLagGrowing", "VisionstreamOrphanedPartitions", "VisionstreamDeadLetters", "VisionstreamWorkerWithoutModel"}
    for alert in alerts:
        used = set(re.findall(r"visionstream_[a-z_]+", alert["expr"]))
        assert used and used <= exported, (alert["alert"], used - exported)
        assert 'namespace="vision"' in alert["expr"]
    [monitor] = [doc for doc in docs if doc["kind"] == "PodMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"] == {"dask.org/cluster-name": "vs-visionstream-dask"}
    pods = pods_of(docs)
    for whose in ("scheduler", "dask-worker"):
        ports = {port["name"] for port in pods[whose]["containers"][0]["ports"]}
        assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports


def test_dask_speaks_mutual_tls_by_default_from_a_secret_the_user_names():
    with pytest.raises(Exception, match="dask.tls.secretName"):
        render({}, as_given=True)  # the defaults: no Secret named, no install
    docs = render()
    pods = pods_of(docs)
    scheduler, worker, stream = (pods[whose]["containers"][0] for whose in ("scheduler", "dask-worker", "stream-worker"))
    assert scheduler["args"][-2:] == ["--protocol", "tls"]
    assert worker["args"][2] == "tls://vs-visionstream-dask-scheduler.vision.svc:8786"  # the operator's own address says tcp://
    for container, role in ((scheduler, "SCHEDULER"), (worker, "WORKER")):
        env = {item["name"]: item.get("value") for item in container["env"]}
        assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
        assert env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"] == "/etc/dask-tls/tls.crt"
        assert env[f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY"] == "/etc/dask-tls/tls.key"
    env = {item["name"]: item.get("value") for item in stream["env"]}
    assert env["VISIONSTREAM_CLUSTER__SCHEDULER"].startswith("tls://")
    assert (env["VISIONSTREAM_CLUSTER__TLS_CA"], env["VISIONSTREAM_CLUSTER__TLS_CERT"], env["VISIONSTREAM_CLUSTER__TLS_KEY"]) == (
        "/etc/dask-tls/ca.crt", "/etc/dask-tls/tls.crt", "/etc/dask-tls/tls.key")
    for whose in ("scheduler", "dask-worker", "stream-worker"):
        volume = next(volume for volume in pods[whose]["volumes"] if volume["name"] == "dask-tls")
        assert volume["secret"] == {"secretName": "vs-dask-tls", "defaultMode": 0o400}, whose
        [mount] = [mount for mount in pods[whose]["containers"][0]["volumeMounts"] if mount["name"] == "dask-tls"]
        assert mount["readOnly"] is True
    plain = pods_of(render({"dask": {"tls": {"enabled": False}}}, as_given=True))
    assert "--protocol" not in plain["scheduler"]["containers"][0]["args"]
    assert not any(volume["name"] == "dask-tls" for pod in plain.values() for volume in pod.get("volumes", []))
    assert {item["name"]: item.get("value") for item in plain["stream-worker"]["containers"][0]["env"]}["VISIONSTREAM_CLUSTER__SCHEDULER"].startswith("tcp://")


def test_the_stream_workers_tls_settings_are_ones_the_service_accepts():
    """The environment the chart gives the stream worker loads as settings and makes a client
    Security with mutual TLS (files the pod mounts)."""
    from inference.client.connection import client_security
    from inference.settings import load_settings

    [container] = pods_of(render())["stream-worker"]["containers"]
    environ = {item["name"]: item["value"] for item in container["env"] if item["name"].startswith("VISIONSTREAM_CLUSTER__")}
    settings = load_settings(environ=environ).cluster
    assert settings.scheduler.startswith("tls://") and settings.tls_ca == "/etc/dask-tls/ca.crt"
    security = client_security(settings)
    assert security is not None and security.require_encryption


def test_the_stream_worker_can_run_its_own_small_image_and_the_dask_pods_keep_theirs():
    pods = pods_of(render())
    assert pods["stream-worker"]["containers"][0]["image"] == pods["dask-worker"]["containers"][0]["image"] == "visionstream:0.1.0"
    pods = pods_of(render({"streamWorker": {"image": {"repository": "registry/visionstream-stream"}}, "image": {"repository": "registry/visionstream", "tag": "1.2.3"}}))
    assert pods["stream-worker"]["containers"][0]["image"] == "registry/visionstream-stream:1.2.3"
    assert [pod["containers"][0]["image"] for whose, pod in pods.items() if whose.startswith("test-")] == ["registry/visionstream-stream:1.2.3"]
    assert pods["dask-worker"]["containers"][0]["image"] == pods["scheduler"]["containers"][0]["image"] == "registry/visionstream:1.2.3"
