"""agentctl: the command line of ledgerbus, a thin layer over the packages.

It is the only place where errors become messages for people.
"""
