"""Provider metadata read by Airflow's ProvidersManager (entry point ``apache_airflow_provider``)."""

from __future__ import annotations

from decisionflow import __version__

_INTEGRATIONS = {
    # integration name -> (hook modules, operator modules, sensor modules, trigger modules)
    "Apache Kafka": (["decisionflow.hooks.kafka"], ["decisionflow.operators.kafka"], [], ["decisionflow.triggers.kafka"]),
    "Apache Spark + Delta Lake": (["decisionflow.hooks.lake"], ["decisionflow.operators.spark"], [], []),
    "MLflow": (["decisionflow.hooks.mlflow"], ["decisionflow.operators.mlflow"], [], []),
    "Ray": (["decisionflow.hooks.ray"], [], [], []),
    "Ray Serve": (["decisionflow.hooks.ray_serve"], ["decisionflow.operators.serving"], [],
                  ["decisionflow.triggers.canary"]),
    "Milvus": (["decisionflow.hooks.milvus"], ["decisionflow.operators.vectors"], [], []),
    "Feast": (["decisionflow.hooks.feast"], ["decisionflow.operators.feast"], [], []),
    "LangChain": (["decisionflow.hooks.llm"], [], [], []),
    "decisionflow decisions": ([], ["decisionflow.operators.decisions", "decisionflow.operators.review"], [], []),
    "decisionflow platform": ([], ["decisionflow.operators.platform"], [], []),
}

CONNECTION_TYPES = [
    {"connection-type": "delta_lake", "hook-class-name": "decisionflow.hooks.lake.LakeHook"},
    {"connection-type": "mlflow", "hook-class-name": "decisionflow.hooks.mlflow.MlflowHook"},
    {"connection-type": "ray", "hook-class-name": "decisionflow.hooks.ray.RayHook"},
    {"connection-type": "milvus", "hook-class-name": "decisionflow.hooks.milvus.MilvusHook"},
    {"connection-type": "feast", "hook-class-name": "decisionflow.hooks.feast.FeastHook"},
    {"connection-type": "llm", "hook-class-name": "decisionflow.hooks.llm.LlmHook"},
]


def _section(kind_index: int) -> list[dict]:
    return [
        {"integration-name": name, "python-modules": modules[kind_index]}
        for name, modules in _INTEGRATIONS.items()
        if modules[kind_index]
    ]


def get_provider_info() -> dict:
    return {
        "package-name": "decisionflow",
        "name": "decisionflow",
        "description": "Hooks, operators, sensors and triggers for the decisionflow data -> model -> decision loop: "
        "Kafka, Spark + Delta Lake, Feast, MLflow, Ray Serve, Milvus and a LangGraph agent.",
        "versions": [__version__],
        "integrations": [
            {"integration-name": name, "external-doc-url": "https://github.com/decisionflow", "tags": ["software"]}
            for name in _INTEGRATIONS
        ],
        "hooks": _section(0),
        "operators": _section(1),
        "sensors": _section(2),
        "triggers": [
            {"integration-name": s["integration-name"], "python-modules": s["python-modules"]} for s in _section(3)
        ],
        "connection-types": CONNECTION_TYPES,
        "notifications": ["decisionflow.notifications.failure.FailureNotifier"],
    }
