"""``python -m agentctl``."""

from agentctl.cli import main

main()
