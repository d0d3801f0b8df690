"""``agentctl init``: write a working project from the templates shipped in the package."""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

import click

from ledgerbus.agentctl.common import EXIT_FAILED, err, fail
from ledgerbus.bus.home import is_project

FILES = {"Procfile": "Procfile", "nats.conf": "nats.conf", "policy.toml": "policy.toml", "llm.toml": "llm.toml",
         "profiles.toml": "profiles.toml", "README.md": "README.md", "gitignore": ".gitignore"}
"""Template (in ``ledgerbus/project``) -> the file it becomes in the new project."""


def write_project(target: Path, force: bool = False) -> list[Path]:
    """Copy the templates into ``target`` (made if missing); the files written. Refuses,
    naming them, to overwrite files that exist unless ``force``."""
    templates = resources.files("ledgerbus") / "project"
    existing = [name for name in FILES.values() if (target / name).exists()]
    if existing and not force:
        raise FileExistsError(", ".join(existing))
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for source, name in FILES.items():
        with resources.as_file(templates / source) as path:
            shutil.copyfile(path, target / name)
        written.append(target / name)
    (target / "var").mkdir(exist_ok=True)
    return written


@click.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite the project files that exist already.")
def init(directory: Path, force: bool) -> None:
    """Make DIRECTORY (default: here) a ledgerbus project: Procfile, nats.conf, policy.toml,
    llm.toml, profiles.toml and a README of its own. Then `cd DIRECTORY && honcho start`."""
    try:
        write_project(directory, force)
    except FileExistsError as exc:
        fail(f"{directory} has {exc} already: nothing written (--force overwrites them)", EXIT_FAILED)
    except OSError as exc:
        fail(f"cannot write the project in {directory}: {exc.strerror or exc}")
    assert is_project(directory)
    where = directory.resolve()
    err.print(f"[green]wrote a ledgerbus project in {where}[/]\n"
              f"  cd {where} && honcho start      [dim]# the whole system[/]\n"
              "  agentctl submit echo --input '{\"text\": \"hi\"}' --wait      [dim]# from anywhere inside it[/]")
    if shutil.which("honcho") is None:
        err.print("[yellow]honcho is not installed here:[/] pip install 'ledgerbus\\[local]' (or run each line of "
                  "the Procfile yourself)")
