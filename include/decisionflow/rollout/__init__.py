"""Safe model rollouts on Ray Serve, in plain Python (no Airflow): the declarative Serve config
(:mod:`~decisionflow.rollout.serve_config`), the canary analysis (:mod:`~decisionflow.rollout.analysis`), the
rollout plan (:mod:`~decisionflow.rollout.plan`) and the history in ``serving/rollouts`` and on the MLflow version
(:mod:`~decisionflow.rollout.history`). The provider's ``RayServeHook``, ``RayServeDeployOperator``,
``RolloutOperator`` and ``CanaryAnalysisTrigger`` are thin layers over these.
"""
