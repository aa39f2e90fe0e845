"""Exceptions shared across the layers (plain Python, no Airflow).

:class:`NotReadyError` is what a fresh platform raises until the loop has run once: a table not built yet, no
champion yet. It is not a failure: the operators turn it into a skip with the message (which says what to run),
so `make up` followed by the first scheduled ticks shows skipped tasks, not red ones, and nothing is decided
or trained on nothing.
"""

from __future__ import annotations


class NotReadyError(RuntimeError):
    """The input of this step does not exist yet (a fresh platform); the message names it and what builds it."""
