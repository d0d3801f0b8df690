"""Agents: separate processes that pull work for their skills, run it, and report back.

The public API for skill authors is :mod:`agents.skill`.
"""
