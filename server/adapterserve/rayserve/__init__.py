"""adapterserve on Ray Serve: an ingress deployment with the single-machine server's API in
front of N engine replicas, each a shared-mode host with its own engines over the same
stores (see docs/scaling.md).

- `replica.py`: the engine replica deployment (host, metrics, adapter leases).
- `ingress.py`: the ingress deployment (the same FastAPI app over `replica_set.py`).
- `app.py`: the application builder (`import_path: adapterserve.rayserve.app:build`), and
  `serve --ray` on a local Ray cluster.

Requires the `ray` extra (`pip install "adapterserve[ray]"`).
"""
