"""``python -m ledgerbus.agentctl``."""

from ledgerbus.agentctl.cli import main

main()
