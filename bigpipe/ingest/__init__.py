"""Ingest: a call's way in, from the HTTP request to a durable Kafka record."""
