"""Projections: SQLite views of the audit log, each rebuilt from it at will."""
