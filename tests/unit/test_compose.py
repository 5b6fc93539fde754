"""docker-compose.yml: valid for docker-compose, secure by default, and consistent with the
settings it feeds. Structural checks on the parsed YAML; no Docker engine needed."""

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from inference.settings import load_settings
from streams.service.kafka import all_topics

REPO = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (REPO / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
ONE_SHOT = {name for name in SERVICES if name.endswith("-init")}
LONG_RUNNING = sorted(SERVICES.keys() - ONE_SHOT)
STORAGE_READERS = {"visionstream", "dask-worker", "dask-worker-cpu"}

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}, ${NAME:+alt}
VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|KEY(?!STORE_(?:TYPE|LOCATION))", re.IGNORECASE)  # a keystore's type or path is no secret
LOOPBACK_HOST = re.compile(r"127\.0\.0\.1|\$\{(?P<variable>[A-Z_]+_BIND_ADDRESS):-127\.0\.0\.1\}")
OUR_IMAGE = {name for name, service in SERVICES.items() if str(service.get("image", "")).startswith("visionstream:")}
MUST_RESTART = {"unless-stopped", "always", "on-failure"}
MC_USER_ADD = "printf '%s\\n' \"$SERVICE_PASSWORD\" | mc admin user add local \"$SERVICE_USER\""  # the secret on stdin


def variables(text: str) -> list[re.Match[str]]:
    return [match for match in VARIABLE.finditer(text) if text[match.start() - 1 : match.start()] != "$"]  # $${...} is escaped


def required_variables() -> set[str]:
    return {match["name"] for match in variables(COMPOSE_TEXT) if match["op"] == ":?"}


def with_defaults(value: str) -> str:
    """A compose value with every ${NAME:-default} replaced by its default."""
    return VARIABLE.sub(lambda m: m["arg"] if m["op"] in (":-", "-") else m[0], str(value))


def referenced(value: object) -> set[str]:
    return {match["name"] for match in variables(str(value))}


def script(service: str) -> str:
    """The shell script a one-shot service runs, as the shell sees it ($$ is compose's $)."""
    return SERVICES[service]["command"][0].replace("$$", "$")


def environment(service: str) -> dict[str, str]:
    return {key: str(value) for key, value in (SERVICES[service].get("environment") or {}).items()}


def published(service: str) -> list[tuple[str, str, str]]:
    """(host address, host port, container port) of each published port."""
    ports = []
    for entry in SERVICES[service].get("ports") or []:
        if isinstance(entry, dict):
            ports.append((str(entry.get("host_ip", "")), str(entry.get("published", "")), str(entry["target"])))
            continue
        parts = str(entry).rsplit(":", 2)  # [host address:][host port:]container port
        ports.append(tuple(parts) if len(parts) == 3 else ("", parts[0] if len(parts) == 2 else "", parts[-1]))
    return ports


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


# --- docker-compose accepts the file, and refuses it without its secrets -------------------------

def run_compose(tmp_path: Path, values: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """docker-compose with only `values` for the required variables: an env file of our own (not
    the checkout's .env, which may hold a developer's secrets) and none of them inherited."""
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    inherited = {key: value for key, value in os.environ.items()
                 if key not in required_variables() and not key.startswith(("STACK_", "COMPOSE_"))}
    return subprocess.run(
        ["docker-compose", "--env-file", str(env_file), "-f", "docker-compose.yml", *args, "config", "-q"],
        cwd=REPO, env=inherited, capture_output=True, text=True,
    )


SECRETS_FOR_TEST = {name: f"test{index}0123456789" for index, name in enumerate(sorted(required_variables()))}
needs_compose = pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose client not installed (.ci/run installs it)")


@needs_compose
# ids spelled out: a bare "gpu" id would read as the gpu marker and skip without CUDA
@pytest.mark.parametrize("profile", [None, "gpu", "cpu", "monitoring", "monitoring-gpu"], ids=lambda p: f"profile={p}")
def test_docker_compose_accepts_the_file_with_its_secrets_set(tmp_path, profile):
    done = run_compose(tmp_path, SECRETS_FOR_TEST, *(["--profile", profile] if profile else []))
    assert done.returncode == 0, done.stderr


@needs_compose
def test_docker_compose_refuses_the_file_without_the_minio_root_password(tmp_path):
    done = run_compose(tmp_path, {k: v for k, v in SECRETS_FOR_TEST.items() if k != "MINIO_ROOT_PASSWORD"})
    assert done.returncode != 0 and "MINIO_ROOT_PASSWORD" in done.stderr, done.stderr


# --- what is there ------------------------------------------------------------------------------

def test_the_services_are_all_there():
    assert {"kafka", "kafka-init", "minio", "minio-init", "dask-scheduler", "dask-worker", "dask-worker-cpu", "visionstream"} <= SERVICES.keys()
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper


def test_gpu_workers_reserve_nvidia_devices_and_a_cpu_profile_exists():
    [device] = SERVICES["dask-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert SERVICES["dask-worker"]["profiles"] == ["gpu"] and SERVICES["dask-worker-cpu"]["profiles"] == ["cpu"]
    assert "deploy" not in SERVICES["dask-worker-cpu"]


# --- exposure -----------------------------------------------------------------------------------

@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_published_port_binds_to_loopback_unless_the_operator_says_otherwise(service):
    for host, host_port, container_port in published(service):
        assert LOOPBACK_HOST.fullmatch(host), f"{service} publishes {host_port}:{container_port} on {host or 'every interface'}"


def test_each_published_service_has_a_bind_setting_of_its_own():
    """Opening Kafka to clients must not open the MinIO console, the Dask dashboard or Grafana."""
    owners: dict[str, set[str]] = {}
    for service in SERVICES:
        for host, host_port, _ in published(service):
            variable = LOOPBACK_HOST.fullmatch(host)["variable"]
            assert variable, f"{service}:{host_port} binds to a fixed address"
            owners.setdefault(variable, set()).add(f"{service}:{host_port}")
    assert all(len(ports) == 1 for ports in owners.values()), owners
    example = (REPO / ".env.example").read_text()
    assert all(f"# {variable}=127.0.0.1" in example for variable in owners), "each is documented in .env.example"


def test_the_scheduler_is_on_a_network_of_its_own():
    """Only what must talk to the scheduler reaches 8786: not Kafka, not MinIO, not Grafana."""
    networks = {name: set(service.get("networks") or ["default"]) for name, service in SERVICES.items()}
    assert networks["dask-scheduler"] == {"dask"}
    on_dask = {name for name, nets in networks.items() if "dask" in nets}
    assert on_dask == {"dask-scheduler", "dask-worker", "dask-worker-cpu", "visionstream", "prometheus"}
    for reader in STORAGE_READERS:
        assert networks[reader] & networks["minio"], f"{reader} must still reach MinIO"


def test_the_dask_workers_are_reachable_from_the_scheduler_minio_and_prometheus_networks_only():
    """Whoever reaches a Dask worker's ports can run code there, with the storage credentials:
    not Kafka, not the init jobs, not Grafana (issue 35)."""
    networks = {name: set(service.get("networks") or ["default"]) for name, service in SERVICES.items()}
    for worker in ("dask-worker", "dask-worker-cpu"):
        assert networks[worker] == {"dask", "storage"}, networks[worker]
    on_storage = {name for name, nets in networks.items() if "storage" in nets}
    assert on_storage == {"minio", "dask-worker", "dask-worker-cpu"}, on_storage


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_no_container_gains_privileges_and_ours_run_read_only_without_capabilities(service):
    spec = SERVICES[service]
    if service == "dcgm-exporter":
        pytest.skip("NVIDIA's exporter needs its own privileges to read the GPUs")
    assert "no-new-privileges:true" in spec.get("security_opt", []), service
    if service in OUR_IMAGE:
        assert spec.get("read_only") is True and spec.get("cap_drop") == ["ALL"] and spec.get("pids_limit")
        assert "/tmp" in spec.get("tmpfs", [])
    elif service != "minio" and service != "minio-init":  # MinIO's images run as root
        assert spec.get("cap_drop") == ["ALL"], service


def test_the_stream_worker_only_reads_the_model_cache_and_writes_its_data_dir():
    volumes = SERVICES["visionstream"]["volumes"]
    assert "model-cache:/models/torch:ro" in volumes
    data_dir = yaml.safe_load((REPO / "configs" / "compose.yaml").read_text())["worker"]["data_dir"]
    assert any(volume.split(":")[1] == data_dir for volume in volumes if not volume.endswith(":ro"))


def test_no_secret_is_ever_on_a_command_line():
    """Arguments show in `ps` to every user of the host; passwords go through files or the environment."""
    # printf and export are the shell's own (no process, no argv): `mc admin user add` reads the
    # secret on its stdin from printf (MC_USER_ADD)
    for service in ("kafka-init", "minio-init", "kafka-tls-init"):
        for line in script(service).splitlines():
            if re.search(r"\$\{?[A-Z_]*PASSWORD", line) and not line.lstrip().startswith(("#", "export ", "printf ")):
                raise AssertionError(f"{service} passes a secret as an argument: {line.strip()}")
    assert "--add-config-file" in script("kafka-init") and "umask 077" in script("kafka-init")


def acl_grants(principal: str) -> list[str]:
    """kafka-init's ACL lines for ``principal`` (``acl`` is the outside user's helper)."""
    lines = [line.strip() for line in script("kafka-init").splitlines()]
    if principal == "$SCRAM_USER":
        return [line for line in lines if line.startswith("acl ")]
    return [line.removeprefix(f"acl_for {principal} ") for line in lines if line.startswith(f"acl_for {principal} ")]


def test_the_outside_kafka_user_may_produce_uploads_and_read_results_and_nothing_else():
    env = environment("kafka")
    assert env["KAFKA_AUTHORIZER_CLASS_NAME"].endswith("StandardAuthorizer")
    assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert acl_grants("$SCRAM_USER") == [
        "acl --operation Write --operation Describe --topic image-uploads",
        "acl --operation Read --operation Describe --topic predictions --topic image-uploads-dlq",
        'acl --operation Read --group "$SCRAM_USER-" --resource-pattern-type prefixed',
    ]
    assert 'acl() { acl_for "$SCRAM_USER" "$@"; }' in script("kafka-init")
    assert '--allow-principal "User:$principal"' in script("kafka-init")


def kafka_listeners() -> dict[str, tuple[str, str, str]]:
    """Kafka's listeners: name -> (host bound, port, security protocol)."""
    env = environment("kafka")
    protocols = dict(pair.split(":") for pair in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    bound = {}
    for listener in env["KAFKA_LISTENERS"].split(","):
        name, address = listener.split("://")
        host, port = address.rsplit(":", 1)
        bound[name] = (host, port, protocols[name])
    return bound


def test_no_unauthenticated_kafka_principal_is_reachable_beyond_the_brokers_own_loopback():
    """A PLAINTEXT listener's clients are all User:ANONYMOUS, a super user here: any container on
    the compose network could otherwise read, write and delete every topic."""
    env = environment("kafka")
    listeners = kafka_listeners()
    for name, (host, _, protocol) in listeners.items():
        assert protocol.startswith("SASL_") or host == "127.0.0.1", f"{name} lets anyone in from the network"
    assert env["KAFKA_SUPER_USERS"] == "User:ANONYMOUS"  # the loopback listeners' principal alone
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] == "LOCAL" and listeners["LOCAL"][0] == "127.0.0.1"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"1@127.0.0.1:{listeners['CONTROLLER'][1]}"
    internal = listeners["INTERNAL"]
    assert internal[2] == "SASL_PLAINTEXT" and env["KAFKA_LISTENER_NAME_INTERNAL_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"
    assert f"INTERNAL://kafka:{internal[1]}" in env["KAFKA_ADVERTISED_LISTENERS"]
    # whoever uses the loopback listener shares the broker's network namespace
    for service, definition in SERVICES.items():
        if "127.0.0.1:9094" in json.dumps(definition) and service != "kafka":
            assert definition.get("network_mode") == "service:kafka", service
    assert "127.0.0.1:9094" in " ".join(SERVICES["kafka"]["healthcheck"]["test"])


def test_minio_and_the_stream_worker_each_reach_kafka_as_a_user_of_their_own_with_only_what_it_needs():
    minio = environment("minio")
    assert minio["MINIO_NOTIFY_KAFKA_SASL_PRIMARY"] == "on" and minio["MINIO_NOTIFY_KAFKA_SASL_MECHANISM_PRIMARY"] == "sha512"
    assert minio["MINIO_NOTIFY_KAFKA_SASL_USERNAME_PRIMARY"] == "minio-notify"
    assert referenced(minio["MINIO_NOTIFY_KAFKA_SASL_PASSWORD_PRIMARY"]) == {"KAFKA_NOTIFY_PASSWORD"}
    assert acl_grants("minio-notify") == ["--operation Write --operation Describe --topic image-uploads"]
    assert referenced(environment("visionstream")["VISIONSTREAM_KAFKA__SASL_PASSWORD"]) == {"KAFKA_SERVICE_PASSWORD"}
    settings = load_settings(REPO / "configs" / "compose.yaml", environ={})
    group, topics = settings.kafka.consumer_group, all_topics(settings.topics)
    grants = acl_grants("visionstream")
    assert grants == [
        "--operation All --topic image-uploads --resource-pattern-type prefixed",
        "--operation All --topic predictions",
        f"--operation All --topic {settings.topics.models}",
        f"--operation All --group {group} --resource-pattern-type prefixed",
        "--operation Describe --operation IdempotentWrite --cluster",
    ]
    assert all(topic.startswith("image-uploads") or topic in ("predictions", settings.topics.models) for topic in topics), topics
    kafka_init = environment("kafka-init")
    for name in ("SERVICE_PASSWORD", "NOTIFY_PASSWORD"):
        [match] = variables(kafka_init[name])
        assert match["op"] == ":?", f"{name} must be required"
    for name in ("visionstream", "minio-notify"):
        assert f"user {name} " in script("kafka-init")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("taken", ["visionstream", "minio-notify"])
def test_kafka_init_refuses_an_outside_user_named_as_one_of_the_stacks_own(tmp_path, taken):
    """Else it would reset the stream worker's (or MinIO's) password to the outside user's."""
    bin_dir = tmp_path / "opt" / "kafka" / "bin"
    commands = script("kafka-init").replace("/opt/kafka/bin/", f"{bin_dir}/")
    bin_dir.mkdir(parents=True)
    calls = tmp_path / "calls"
    for tool in ("kafka-topics.sh", "kafka-configs.sh", "kafka-acls.sh"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {calls}\n')
        (bin_dir / tool).chmod(0o755)
    env = {"PATH": os.environ["PATH"], "SCRAM_PASSWORD": "a", "SERVICE_PASSWORD": "b", "NOTIFY_PASSWORD": "c"}
    refused = subprocess.run(["bash", "-c", commands], env={**env, "SCRAM_USER": taken}, capture_output=True, text=True)
    assert refused.returncode == 1 and "may not be" in refused.stderr and not calls.exists()
    accepted = subprocess.run(["bash", "-c", commands], env={**env, "SCRAM_USER": "outside"}, capture_output=True, text=True)
    assert accepted.returncode == 0, accepted.stderr
    made = [line for line in calls.read_text().splitlines() if line.startswith("kafka-configs.sh")]
    assert [line.split("--entity-name ")[1].split()[0] for line in made] == ["outside", "visionstream", "minio-notify"]
    assert all("127.0.0.1:9094" in line for line in calls.read_text().splitlines())


def test_dask_is_reachable_only_on_the_compose_network_but_its_dashboard_on_loopback():
    published_ports = {(service, container) for service in SERVICES for _, _, container in published(service)}
    assert not any(container == "8786" for _, container in published_ports), "the Dask scheduler port runs code on the workers"
    assert {container for service, container in published_ports if service == "dask-scheduler"} == {"8787"}
    assert not any(service.startswith("dask-worker") for service, _ in published_ports)


def test_kafka_publishes_only_its_scram_listener():
    env = environment("kafka")
    host, port, protocol = kafka_listeners()["EXTERNAL"]
    assert protocol == "SASL_SSL", "passwords are not sent in clear, but everything else would be"
    assert env["KAFKA_LISTENER_NAME_EXTERNAL_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"
    assert "ScramLoginModule required" in env["KAFKA_LISTENER_NAME_EXTERNAL_SCRAM___SHA___512_SASL_JAAS_CONFIG"]
    assert {container for _, _, container in published("kafka")} == {port}
    assert f"EXTERNAL://${{STACK_KAFKA_HOST:-localhost}}:{port}" in env["KAFKA_ADVERTISED_LISTENERS"]


def test_kafkas_outside_listener_serves_a_certificate_made_for_it_with_no_secret_on_a_command_line():
    env = environment("kafka")
    prefix = "KAFKA_LISTENER_NAME_EXTERNAL_SSL_KEYSTORE_"
    assert env[prefix + "TYPE"] == "PKCS12"
    keystore = env[prefix + "LOCATION"]
    [password] = variables(env[prefix + "PASSWORD"])
    assert password["op"] == ":?" and password["name"] == "KAFKA_TLS_KEYSTORE_PASSWORD"
    maker = SERVICES["kafka-tls-init"]
    [volume] = [v for v in SERVICES["kafka"]["volumes"] if v.startswith("kafka-tls:")]
    assert volume == f"kafka-tls:{keystore.rsplit('/', 1)[0]}:ro"  # the broker reads it, never writes it
    assert f"kafka-tls:{keystore.rsplit('/', 1)[0]}" in maker["volumes"]
    assert SERVICES["kafka"]["depends_on"]["kafka-tls-init"]["condition"] == "service_completed_successfully"
    commands = script("kafka-tls-init")
    assert keystore.rsplit("/", 1)[1] in commands
    assert "-storepass:env KAFKA_TLS_KEYSTORE_PASSWORD" in commands and "-storepass " not in commands.replace("-storepass:env", "")
    assert '"SAN=dns:localhost,ip:127.0.0.1,$san"' in commands and "STACK_KAFKA_HOST" in str(maker["environment"]["KAFKA_HOST"])
    assert "rm -f ca.p12" in commands.split("-gencert")[1]  # the CA's key is gone once it has signed
    assert "umask 077" in commands


@pytest.mark.slow  # seven JVM starts and two RSA keys: about 20 s
@pytest.mark.skipif(shutil.which("keytool") is None, reason="needs keytool (a JRE), as the apache/kafka image has")
def test_the_certificate_kafka_tls_init_makes_is_trusted_by_strict_clients_for_the_advertised_host(tmp_path: Path):
    import socket
    import ssl
    import threading

    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, pkcs12

    commands = SERVICES["kafka-tls-init"]["command"][0].replace("$$", "$").replace("/etc/kafka/secrets", str(tmp_path))
    env = {**os.environ, "KAFKA_HOST": "broker.example.org", "KAFKA_TLS_KEYSTORE_PASSWORD": "0123abcd"}
    made = subprocess.run(["bash", "-c", commands], env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.pem", "kafka.p12", "san"]  # no CA key left
    assert oct((tmp_path / "kafka.p12").stat().st_mode & 0o777) == "0o600"
    again = subprocess.run(["bash", "-c", commands], env=env, capture_output=True, text=True, timeout=120)
    assert "keeping the certificate" in again.stdout
    rotated = subprocess.run(["bash", "-c", commands], env=env | {"KAFKA_TLS_KEYSTORE_PASSWORD": "4567efgh"}, capture_output=True, text=True, timeout=120)
    assert "made a certificate" in rotated.stdout  # the broker would not open the old one with the new password
    env["KAFKA_TLS_KEYSTORE_PASSWORD"] = "4567efgh"

    key, cert, chain = pkcs12.load_key_and_certificates((tmp_path / "kafka.p12").read_bytes(), b"4567efgh")
    pem = tmp_path / "server.pem"
    pem.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()) + cert.public_bytes(Encoding.PEM))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(pem)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            try:
                with server.wrap_socket(connection, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    threading.Thread(target=serve, daemon=True).start()

    def handshake(host: str) -> str | None:
        client = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        client.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default
        try:
            with socket.create_connection(listener.getsockname()) as raw, client.wrap_socket(raw, server_hostname=host):
                return None
        except ssl.SSLCertVerificationError as exc:
            return exc.verify_message

    try:
        assert handshake("localhost") is None and handshake("127.0.0.1") is None and handshake("broker.example.org") is None
        assert "mismatch" in handshake("elsewhere.example.org")
    finally:
        listener.close()


def test_kafka_init_creates_the_scram_user_from_required_variables():
    commands = script("kafka-init")
    env = environment("kafka-init")
    assert "--entity-type users" in commands and "SCRAM-SHA-512=[" in commands
    assert '--entity-name "$1"' in commands and "password=%s]" in commands and '"${!2}"' in commands
    assert 'user "$SCRAM_USER" SCRAM_PASSWORD' in commands  # the variable's name, never its value, as an argument
    for name in ("SCRAM_USER", "SCRAM_PASSWORD"):
        [match] = variables(env[name])
        assert match["op"] == ":?", f"{name} must be required"


# --- secrets ------------------------------------------------------------------------------------

def test_no_secret_has_a_default():
    for match in variables(COMPOSE_TEXT):
        if SECRET_NAME.search(match["name"]):
            assert match["op"] == ":?", f"${{{match['name']}}} must be required (:?), not {match['op'] or 'optional'}"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_secret_in_an_environment_is_a_required_variable(service):
    for key, value in environment(service).items():
        if SECRET_NAME.search(key):
            assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", value), f"{service}.{key} is not a required variable: {value!r}"
    assert "env_file" not in SERVICES[service]


def test_no_known_default_secret_is_left_anywhere():
    for text in (COMPOSE_TEXT, (REPO / ".env.example").read_text()):
        for default in ("visionstream-secret", "minioadmin", "admin-secret"):
            assert default not in text


def test_the_example_env_file_lists_every_required_variable_empty_and_the_filled_one_is_never_committed():
    example = read_env_file(REPO / ".env.example")
    assert required_variables() <= example.keys()
    assert all(example[name] == "" for name in required_variables())
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()


def test_secrets_stay_out_of_the_image_build_context():
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert ".env" in ignored and ".env.*" in ignored


def test_the_scheduler_holds_no_storage_credentials():
    env = environment("dask-scheduler")
    assert not [key for key in env if key.startswith(("AWS_", "VISIONSTREAM_STORAGE__")) or SECRET_NAME.search(key)]
    assert not referenced(env) & {"MINIO_SERVICE_USER", "MINIO_SERVICE_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}


def test_only_the_processes_that_read_the_bucket_get_storage_credentials():
    for service in SERVICES:
        env = environment(service)
        has_credentials = any(key.startswith("AWS_") or key.startswith("VISIONSTREAM_STORAGE__") for key in env)
        uses_service_user = bool(referenced(env) & {"MINIO_SERVICE_USER", "MINIO_SERVICE_PASSWORD"})
        if service in STORAGE_READERS:
            assert has_credentials, service
        elif service != "minio-init":  # creates the user
            assert not (has_credentials or uses_service_user), service


def test_the_service_reads_storage_as_its_own_user_never_root():
    for service in STORAGE_READERS:
        env = environment(service)
        assert referenced(env["AWS_ACCESS_KEY_ID"]) == {"MINIO_SERVICE_USER"}, service
        assert referenced(env["AWS_SECRET_ACCESS_KEY"]) == {"MINIO_SERVICE_PASSWORD"}, service
    root_users = {service for service in SERVICES if referenced(SERVICES[service]) & {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}}
    assert root_users == {"minio", "minio-init"}


def test_minio_init_creates_the_service_user_with_a_read_only_policy_on_the_bucket():
    settings = load_settings(REPO / "configs" / "compose.yaml", environ={})
    commands = script("minio-init")
    [mount] = SERVICES["minio-init"]["volumes"]
    source, target, _ = mount.split(":")
    assert f"mc admin policy create local visionstream-read {target}" in commands
    assert MC_USER_ADD in commands
    assert 'mc admin policy attach local visionstream-read --user "$SERVICE_USER"' in commands
    policy = json.loads((REPO / source).read_text())
    granted = {(action, resource) for statement in policy["Statement"] if statement["Effect"] == "Allow"
               for action in statement["Action"] for resource in statement["Resource"]}
    bucket = settings.storage.bucket
    assert granted == {  # GetObjectVersion: reads pinned to the version an event names (storage.pin_versions)
        ("s3:GetObject", f"arn:aws:s3:::{bucket}/*"), ("s3:GetObjectVersion", f"arn:aws:s3:::{bucket}/*"),
        ("s3:ListBucket", f"arn:aws:s3:::{bucket}"),
    }


# --- images, restarts, health -------------------------------------------------------------------

@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_image_tag_is_pinned(service):
    image = with_defaults(SERVICES[service]["image"])
    name = image.rsplit("/", 1)[-1]
    assert "@sha256:" in name or (":" in name and name.rsplit(":", 1)[1] not in ("", "latest")), f"{service}: {image}"


def test_the_service_image_carries_the_package_version():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    for service in ("dask-scheduler", *sorted(STORAGE_READERS - {"visionstream"})):
        assert with_defaults(SERVICES[service]["image"]) == f"visionstream:{version}", service
    assert with_defaults(SERVICES["visionstream"]["image"]) == f"visionstream-stream:{version}"  # its own small image


@pytest.mark.parametrize("service", LONG_RUNNING)
def test_every_long_running_service_restarts_and_has_a_healthcheck(service):
    assert SERVICES[service].get("restart") in MUST_RESTART, f"{service} stays down after a crash"
    healthcheck = SERVICES[service].get("healthcheck") or {}
    assert healthcheck.get("test") and not healthcheck.get("disable"), service


@pytest.mark.parametrize("service", sorted(ONE_SHOT))
def test_one_shot_services_are_not_restarted_forever(service):
    assert SERVICES[service].get("restart", "no") not in ("always", "unless-stopped")


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_dependencies_wait_for_health_or_completion(service):
    depends = SERVICES[service].get("depends_on") or {}
    assert isinstance(depends, dict), f"{service}: depends_on as a list waits for nothing"
    for dependency, spec in depends.items():
        if dependency in ONE_SHOT:
            assert spec["condition"] == "service_completed_successfully", (service, dependency)
        else:
            assert spec["condition"] == "service_healthy", (service, dependency)
            assert SERVICES[dependency]["healthcheck"]["test"], dependency


def test_the_stream_worker_is_judged_by_livez():
    depends = SERVICES["visionstream"]["depends_on"]
    assert depends["kafka-init"]["condition"] == "service_completed_successfully"
    assert depends["dask-scheduler"]["condition"] == "service_healthy"
    check = " ".join(SERVICES["visionstream"]["healthcheck"]["test"])
    assert "localhost:6066/livez" in check
    assert "os.kill(1, signal.SIGTERM)" in check  # a wedged worker exits, so that the restart policy acts


# --- the image ----------------------------------------------------------------------------------

def dockerfile_stages() -> dict[str, list[str]]:
    """The Dockerfile's instructions (continuation lines joined), by stage name."""
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text()).splitlines():
        if line.startswith("FROM "):
            current = stages.setdefault(line.split(" AS ")[-1].strip() if " AS " in line else "", [])
        current.append(line)
    return stages


def test_the_dockerfile_fails_when_the_extra_cannot_install_and_runs_unprivileged():
    stages = dockerfile_stages()
    assert list(stages)[-1] == "worker"  # the default target: the Dask workers' image
    instructions = stages["worker"]
    pip = [line for line in instructions if line.startswith("RUN") and "pip install" in line]
    assert all("-c requirements/constraints.txt" in line for line in pip), pip  # torch too: one set of versions
    installs = [line for line in pip if "torch==" not in line]
    assert installs, "the package is not installed"
    for line in installs:
        assert "||" not in line and " -e " not in line, line
        assert "EXTRAS" in line, line
    assert "ARG EXTRAS=gpu" in instructions
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")


# --- consistent with the settings ---------------------------------------------------------------

def test_minio_notifies_the_uploads_topic_and_init_creates_every_topic():
    settings = load_settings(REPO / "configs" / "compose.yaml", environ={})
    minio = SERVICES["minio"]["environment"]
    assert minio["MINIO_NOTIFY_KAFKA_TOPIC_PRIMARY"] == settings.topics.uploads
    assert minio["MINIO_NOTIFY_KAFKA_BROKERS_PRIMARY"] == settings.kafka.bootstrap_servers
    commands = script("kafka-init")
    created = re.search(r"for topic in ([^;]+);", commands).group(1).split()
    created.append(re.search(r"--topic (\S+) --partitions 1 --replication-factor \d+ --config cleanup.policy=compact", commands).group(1))
    assert sorted(created) == sorted(all_topics(settings.topics))
    assert created[-1] == settings.topics.models  # one partition, compacted, as the service creates it
    assert f"--partitions {settings.topics.partitions}" in commands
    assert f"--replication-factor {settings.topics.replication_factor}" in commands


def test_one_broker_replicates_once_and_production_three_times():
    compose = load_settings(REPO / "configs" / "compose.yaml", environ={})
    production = load_settings(REPO / "configs" / "production.yaml", environ={})
    assert compose.topics.replication_factor == 1  # a single broker cannot hold more copies
    assert production.topics.replication_factor == 3
    assert production.kafka.security_protocol == "SASL_SSL" and production.kafka.sasl_mechanism == "SCRAM-SHA-512"


def test_every_setting_the_compose_file_passes_exists():
    env: dict[str, str] = {}
    for service in SERVICES.values():
        env.update({k: str(v) for k, v in (service.get("environment") or {}).items() if k.startswith("VISIONSTREAM_")})
    assert env, "the compose file sets no VISIONSTREAM_ variables?"
    resolved = {k: "s3cret" if match["op"] == ":?" else with_defaults(v) for k, v in env.items() for match in [VARIABLE.search(v) or {"op": None}]}
    assert not [v for v in resolved.values() if "${" in v], resolved
    settings = load_settings(REPO / "configs" / "compose.yaml", environ=resolved)  # unknown keys raise ConfigError
    assert settings.cluster.scheduler == "tcp://dask-scheduler:8786"
    assert settings.storage.endpoint_url == "http://minio:9000" and settings.storage.secret_access_key is None
    kafka = settings.kafka  # as the user kafka-init makes, with its password from the environment
    assert (kafka.security_protocol, kafka.sasl_mechanism, kafka.sasl_username) == ("SASL_PLAINTEXT", "SCRAM-SHA-512", "visionstream")
    assert kafka.sasl_password.get_secret_value() == "s3cret"


def test_the_compose_level_variables_are_no_settings():
    """VISIONSTREAM_* names are read as settings by every `visionstream` command: a compose
    variable named so, once exported in a shell, would make the CLI refuse to start."""
    for match in variables(COMPOSE_TEXT):
        assert not match["name"].startswith("VISIONSTREAM_"), match["name"]


# --- from bucket to prediction ----------------------------------------------------------------

def test_the_stream_worker_may_finish_its_drain_before_docker_kills_it():
    settings = load_settings(REPO / "configs" / "compose.yaml")
    grace = SERVICES["visionstream"]["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > settings.worker.shutdown_grace_s + 2 * 10  # drain, commit, producer stop


def test_minio_queues_notifications_kafka_cannot_take_on_a_volume_of_its_own():
    env = environment("minio")
    queue = env["MINIO_NOTIFY_KAFKA_QUEUE_DIR_PRIMARY"]
    assert any(volume.endswith(f":{queue}") and not volume.startswith("minio-data") for volume in SERVICES["minio"]["volumes"])
    assert int(env["MINIO_NOTIFY_KAFKA_QUEUE_LIMIT_PRIMARY"]) > 0


def test_the_bucket_rule_covers_every_key_the_service_accepts():
    """MinIO's suffix filter is case-sensitive: one rule without one, the service filters."""
    rules = [line for line in script("minio-init").splitlines() if "mc event add" in line]
    assert len(rules) == 1 and "--suffix" not in rules[0] and "--event put" in rules[0]


def test_dask_workers_share_the_host_and_the_gpu_profile_refuses_the_cpu():
    for service in ("dask-worker", "dask-worker-cpu"):
        assert environment(service)["VISIONSTREAM_LOCAL_WORKERS"] == "${STACK_WORKERS_PER_HOST:-1}"
        assert environment(service)["AWS_DEFAULT_REGION"] and "AWS_REGION" not in environment(service)
    assert environment("dask-worker")["VISIONSTREAM_MODEL__DEVICE"] == "cuda"


def test_cpu_workers_keep_their_compiled_forward_on_a_volume_and_can_build_it():
    settings = load_settings(REPO / "configs" / "compose.yaml", environ={})
    cache = settings.model.compile_cache_dir
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in SERVICES["dask-worker-cpu"]["volumes"]}
    assert cache and any(cache.startswith(path + "/") for path in mounts), (cache, mounts)
    volume = next(name for path, name in mounts.items() if cache.startswith(path + "/"))
    assert volume in COMPOSE["volumes"]  # named: kept across restarts, and never the host's /tmp
    dockerfile = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    assert re.search(r"apt-get install[^\n]* g\+\+", dockerfile), "no C++ compiler: CPU workers would stay eager"
    assert re.search(r"chmod 0700 [^\n]*/var/cache/visionstream", dockerfile)  # a new volume copies the mode: private


def test_the_stream_worker_runs_from_an_image_without_torch():
    """A new replica pulls the stream image, not gigabytes of torch and CUDA: its stage installs
    the project's dependencies less torch, torchvision and Pillow, then the package alone."""
    import tomllib

    stream = dockerfile_stages()["stream"]
    pip = [line for line in stream if line.startswith("RUN") and "pip install" in line]
    assert pip and all("torch" not in line for line in pip), pip
    assert any("-c requirements/constraints.txt -r requirements/stream.txt" in line for line in pip)
    assert any("pip install --no-deps ." in line for line in pip)
    assert [line.split()[1] for line in stream if line.startswith("USER ")][-1] not in ("root", "0")
    required = [line for line in (REPO / "requirements" / "stream.txt").read_text().splitlines() if line and not line.startswith("#")]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert required == [dep for dep in project if re.split(r"[<>=\[]", dep)[0].lower() not in ("torch", "torchvision", "pillow")]
    service = SERVICES["visionstream"]
    assert service["build"] == {"context": ".", "target": "stream"} and service["image"].startswith("visionstream-stream:")
    for worker in ("dask-worker", "dask-worker-cpu", "dask-scheduler"):
        assert SERVICES[worker]["build"]["target"] == "worker", worker
