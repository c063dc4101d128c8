"""Operator tools: dead letters, redrive, replay and the live view."""
