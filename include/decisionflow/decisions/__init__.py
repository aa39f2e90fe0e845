"""Decisions: the versioned policy, the decision graph, the audit trail and the action outbox.

Plain Python, no Airflow. Importing the package imports nothing heavy (no pandas): serving imports the policy.
"""
