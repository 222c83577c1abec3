"""Hosting on Ray Serve: the ingress's view of a set of engine replicas.

`remote.py` is the Host the ingress serves through (it resolves names from a catalog the
replicas publish and sends each request to a replica, adapter requests with their name as
Ray Serve's multiplexed model id); `wire.py` is what crosses between ingress and replicas.
The deployments themselves (which build a shared host and metrics in each replica) are
composition and live in `adapterserve.rayserve`. Ray is an optional extra: nothing here
imports it at module import.
"""
