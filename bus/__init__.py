"""The shared foundation of ledgerbus: events, codec, subjects, provisioning, connection.

Every other package builds on this one and nothing here imports them.
"""
