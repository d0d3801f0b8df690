"""Built-in skills, registered through the same ``ledgerbus.skills`` entry points as any plugin."""
