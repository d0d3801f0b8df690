"""Fail points: the spec is parsed strictly, an armed point kills its process at exactly
the hit it names, and an unarmed one does nothing."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from ledgerbus.bus import failpoints
from ledgerbus.bus.errors import ConfigError
from ledgerbus.bus.settings import Settings
from tests.support import agentctl


def test_a_spec_names_kill_points_with_their_hit_and_switched_off_points() -> None:
    kills, off = failpoints.parse(" router.appended=kill@3, projector.applied=kill ,agent.keepalive=off")
    assert kills == {"router.appended": 3, "projector.applied": 1}
    assert off == {"agent.keepalive"}
    assert failpoints.parse("") == ({}, frozenset())


@pytest.mark.parametrize("spec", ["router.appended", "nowhere=kill", "router.appended=kill@0",
                                  "router.appended=explode", "router.appended=kill@x"])
def test_a_malformed_spec_names_the_item_that_is_wrong(spec: str) -> None:
    with pytest.raises(ConfigError, match=spec.split(",")[0].replace(".", r"\.")):
        failpoints.parse(spec)


def test_an_armed_point_kills_the_process_at_the_nth_hit_only() -> None:
    script = ("import sys; from ledgerbus.bus import failpoints; failpoints.arm({'LEDGERBUS_FAILPOINTS': 'router.fetched=kill@3'})\n"
              "for i in range(1, 6):\n    print(i, flush=True); failpoints.reached('router.fetched')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.split() == ["1", "2", "3"]


def test_unarmed_points_do_nothing() -> None:
    failpoints.arm({})
    for _ in range(3):
        failpoints.reached("router.appended")
    assert not failpoints.disabled("agent.keepalive")


async def test_a_process_with_a_malformed_spec_stops_with_a_clear_error(settings: Settings) -> None:
    code, _, err = await agentctl(settings, "router", env={"LEDGERBUS_FAILPOINTS": "router.appended=boom"})
    assert code == 3
    assert "LEDGERBUS_FAILPOINTS: 'router.appended=boom'" in err and "Traceback" not in err
