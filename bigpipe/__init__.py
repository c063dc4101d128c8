"""Bigpipe: a Kafka-backed asynchronous HTTP RPC middleware."""

__version__ = "0.1.0"
