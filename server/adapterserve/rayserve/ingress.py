"""The ingress deployment: the single-machine server's FastAPI app (auth, tenants, request
validation, errors, metrics) over `ReplicaSetHost`, which sends each request to a replica.

The app is built in the replica, after the constructor (Ray Serve's late-bound ingress),
so its lifespan owns a host made with the replicas' handle.
"""

from __future__ import annotations


class Ingress:
    def __init__(self, replicas, settings, adapter_affinity: bool = True):
        self.replicas = replicas  # DeploymentHandle of the EngineReplica deployment
        self.settings = settings
        self.adapter_affinity = adapter_affinity

    def __serve_build_asgi_app__(self):
        from adapterserve.app import create_app
        from adapterserve.rayserve.replica_set import ReplicaSetHost

        def host_factory(settings, observer):
            return ReplicaSetHost(settings, self.replicas, observer, adapter_affinity=self.adapter_affinity)

        settings = self.settings
        if settings.allowed_hosts is None:  # Ray's proxy listens where its config says, not on settings.host
            settings = settings.model_copy(update={"allowed_hosts": ["*"]})
        return create_app(settings, host_factory=host_factory)


def deployment() -> type:
    from ray import serve

    return serve.ingress()(Ingress)
