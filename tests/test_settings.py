"""Settings come from LEDGERBUS_* variables with the types their defaults have."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledgerbus.bus.errors import ConfigError
from ledgerbus.bus.settings import Settings


def test_every_setting_is_read_from_its_variable_with_the_right_type() -> None:
    s = Settings.from_env({
        "LEDGERBUS_URL": "nats://a:1, nats://b:2",
        "LEDGERBUS_DB_PATH": "/tmp/x.db",
        "LEDGERBUS_WORK_ACK_WAIT_S": "2",
        "LEDGERBUS_ROUTER_BATCH": "7",
        "LEDGERBUS_USER": "alice",
        "LEDGERBUS_PASSWORD": "s3cret",
    })
    assert s.servers == ["nats://a:1", "nats://b:2"]
    assert s.db_path == Path("/tmp/x.db") and isinstance(s.db_path, Path)
    assert s.work_ack_wait_s == 2.0 and isinstance(s.work_ack_wait_s, float)
    assert s.router_batch == 7 and isinstance(s.router_batch, int)
    assert (s.user, s.password) == ("alice", "s3cret")


def test_replace_ignores_options_that_were_not_given() -> None:
    s = Settings.from_env({}).replace(url=None, user="bob")
    assert (s.url, s.user) == (Settings().url, "bob")


def test_a_malformed_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="LEDGERBUS_ROUTER_BATCH='many'"):
        Settings.from_env({"LEDGERBUS_ROUTER_BATCH": "many"})


def test_stream_replicas_are_one_to_five_and_a_bad_count_names_the_variable() -> None:
    assert Settings.from_env({}).stream_replicas == 1
    assert Settings.from_env({"LEDGERBUS_STREAM_REPLICAS": "3"}).stream_replicas == 3
    for bad in ("0", "6", "-1"):
        with pytest.raises(ConfigError, match=f"LEDGERBUS_STREAM_REPLICAS={bad}: from 1 to 5"):
            Settings.from_env({"LEDGERBUS_STREAM_REPLICAS": bad})
    with pytest.raises(ConfigError, match="LEDGERBUS_STREAM_REPLICAS='three'"):
        Settings.from_env({"LEDGERBUS_STREAM_REPLICAS": "three"})


def test_the_collector_setting_is_a_positive_count_and_settle_applies_it() -> None:
    import subprocess
    import sys

    assert Settings.from_env({}).gc_gen0 == 20_000
    assert Settings.from_env({"LEDGERBUS_GC_GEN0": "700"}).gc_gen0 == 700
    for bad in ("0", "-5"):
        with pytest.raises(ConfigError, match=f"LEDGERBUS_GC_GEN0={bad}: a number of allocations"):
            Settings.from_env({"LEDGERBUS_GC_GEN0": bad})
    # In a process of its own: settle changes the interpreter it runs in.
    out = subprocess.run(
        [sys.executable, "-c", "import gc; from ledgerbus.bus import heap; heap.settle(12345); "
                               "print(gc.get_threshold()[0], gc.get_freeze_count() > 0)"],
        capture_output=True, text=True, check=True).stdout.split()
    assert out == ["12345", "True"]


def test_commands_find_their_project_as_git_finds_a_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ledgerbus.agentctl.init import write_project
    from ledgerbus.bus.home import find_home

    project = tmp_path / "proj"
    write_project(project)
    deep = project / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert find_home(env={}) == project.resolve()
    settings = Settings.from_env({})
    assert settings.home == project.resolve()
    assert settings.policy_path == project.resolve() / "policy.toml"
    assert settings.auth_dir == project.resolve() / "var" / "auth"
    # An absolute path stays as given; LEDGERBUS_HOME names a project from anywhere.
    assert Settings.from_env({"LEDGERBUS_DB_PATH": "/data/x.db"}).db_path == Path("/data/x.db")
    monkeypatch.chdir(tmp_path)
    assert find_home(env={}) is None and Settings.from_env({}).policy_path == Path("policy.toml")
    assert Settings.from_env({"LEDGERBUS_HOME": str(project)}).llm_config_path == project.resolve() / "llm.toml"
    with pytest.raises(ConfigError, match="LEDGERBUS_HOME=.*not a ledgerbus project .*agentctl init"):
        Settings.from_env({"LEDGERBUS_HOME": str(tmp_path)})
    # init never overwrites a project's files unless told to.
    (project / "policy.toml").write_text("# mine\n")
    with pytest.raises(FileExistsError, match="Procfile, nats.conf, policy.toml"):
        write_project(project)
    assert (project / "policy.toml").read_text() == "# mine\n"
    write_project(project, force=True)
    assert (project / "policy.toml").read_text() == (Path(__file__).parents[1] / "policy.toml").read_text()
