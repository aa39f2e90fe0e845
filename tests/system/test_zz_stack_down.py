"""Last system test: `down` stops exactly what `up` started and leaves no process or listener behind."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.system


def test_stack_down_leaves_nothing(stack):
    services = stack.services
    groups = [s.pid() for s in services]
    stack.down()
    assert stack.listeners_left() == []
    for service, pgid in zip(services, groups):
        assert not service.running(), service.name
        if pgid:
            assert service._group_members(pgid) == [], f"{service.name} left processes behind"
