# decisionflow gateway image: the FastAPI gateway (serving/decisionflow_serving) and Ray, from requirements.lock.
# Runs as uid 50000 / gid 0, the Airflow image's user, so both write the shared data volume (lake, Feast
# registry, token store). One image for three roles in docker/compose.yaml and docker/k8s/rayservice-gateway.yaml:
#   * Ray head / worker nodes (`ray start ...`): Serve replicas import decisionflow_serving.deployments:build_app
#     from this image (Serve configs take no local working_dir);
#   * the plain-uvicorn gateway (the default command: `python -m decisionflow_serving`, one model in-process);
#   * the MLflow tracking server (same pinned mlflow, psycopg2 for the Postgres backend).
#
#   docker build -f docker/gateway.Dockerfile -t decisionflow-gateway:0.1.0 .   # from the project root
FROM python:3.11.14-slim-bookworm

# libgomp1: LightGBM's OpenMP runtime; curl: healthchecks.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 curl \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 50000 --gid 0 decisionflow \
 && mkdir -p /opt/decisionflow/app /opt/decisionflow/data \
 && chown -R 50000:0 /opt/decisionflow

WORKDIR /opt/decisionflow/app
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock
COPY pyproject.toml README.md ./
COPY include/ include/
COPY serving/ serving/
RUN pip install --no-cache-dir --no-deps -e .

USER 50000
ENV DECISIONFLOW_HOME=/opt/decisionflow/app \
    DECISIONFLOW_DATA=/opt/decisionflow/data \
    RAY_USAGE_STATS_ENABLED=0 \
    PYTHONUNBUFFERED=1
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
  CMD ["curl", "-fsS", "http://127.0.0.1:8000/health"]
CMD ["python", "-m", "decisionflow_serving", "--host", "0.0.0.0", "--port", "8000"]
