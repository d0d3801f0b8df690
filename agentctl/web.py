"""``agentctl web``: the HTTP gateway (docs/web.md)."""

from __future__ import annotations

import click

from ledgerbus.agentctl.common import App, fail
from ledgerbus.bus.tracing import configure_telemetry


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, envvar="LEDGERBUS_WEB_HOST",
              help="Address to listen on.  [env LEDGERBUS_WEB_HOST]")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, envvar="LEDGERBUS_WEB_PORT",
              help="Port (0: any free one).  [env LEDGERBUS_WEB_PORT]")
@click.pass_obj
def web(app: App, host: str, port: int) -> None:
    """Run the HTTP API gateway: every request acts as the CLI principal its bearer token
    is bound to (`agentctl keys token add NAME`). OpenAPI at /openapi.json."""
    try:
        import uvicorn

        from ledgerbus.web.app import create_app
    except ImportError as exc:
        fail(f"the gateway needs its extra: pip install 'ledgerbus[web]' ({exc})")
    telemetry = configure_telemetry("ledgerbus-web")
    try:
        uvicorn.run(create_app(app.settings, telemetry), host=host, port=port, log_level=app.log_level,
                    access_log=False, lifespan="on")
    finally:
        telemetry.shutdown()
