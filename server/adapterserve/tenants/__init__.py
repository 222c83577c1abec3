"""Tenants: API keys from a keys file, each with the models it may use, its scopes and its
limits (keys.py: the file; limits.py: requests, tokens and concurrency per key)."""
