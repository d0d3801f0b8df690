"""The Celery side's error labels: an error is called Celery's (with the worker's log)
only when it is, so a failure in the ledgerbus half of the paired bench keeps its own name."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.celery_side import from_celery, labelled
from bench.common import BenchError


def _error_of(package: str) -> type[Exception]:
    # Celery is not in the test extra: an error class as its modules define one.
    return type("TimeoutError", (Exception,), {"__module__": f"{package}.exceptions"})


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "worker.log"
    path.write_text("worker: starting\nworker: lost the broker\n")
    return path


@pytest.mark.parametrize("package", ["celery", "kombu", "redis", "billiard"])
def test_an_error_of_celery_or_its_clients_is_celery_s(package: str) -> None:
    assert from_celery(_error_of(package)("x"))


@pytest.mark.parametrize("exc", [ValueError("x"), OSError("x"), _error_of("nats")("x"), _error_of("celeryx")("x")])
def test_other_errors_are_not(exc: Exception) -> None:
    assert not from_celery(exc)


def test_a_celery_error_in_the_block_comes_with_the_worker_log(log: Path) -> None:
    with pytest.raises(BenchError, match="Celery run failed") as caught, labelled(log, everything=False):
        raise _error_of("celery")("the result did not come")
    assert "the result did not come" in str(caught.value)
    assert "lost the broker" in str(caught.value)


def test_any_other_error_in_the_block_is_raised_as_it_was(log: Path) -> None:
    original = KeyError("ledgerbus's half failed")
    with pytest.raises(KeyError) as caught, labelled(log, everything=False):
        raise original
    assert caught.value is original


def test_while_the_worker_starts_every_error_is_celery_s(log: Path) -> None:
    with pytest.raises(BenchError, match=r"Celery run failed: ValueError") as caught, labelled(log, everything=True):
        raise ValueError("no such task")
    assert "lost the broker" in str(caught.value)


@pytest.mark.parametrize("everything", [True, False])
def test_a_bench_error_passes_unchanged(log: Path, everything: bool) -> None:
    original = BenchError("said already")
    with pytest.raises(BenchError) as caught, labelled(log, everything=everything):
        raise original
    assert caught.value is original
