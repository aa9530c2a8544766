"""A fleet: the same API over every node of a Ray cluster (MODELS_RAY_ADDRESS).

One ``NodeAgent`` (a Ray actor pinned to its node) per alive node runs the single-node service's
own manager (worker processes, verification, the job store) on that node's cache; ``Fleet``
(in the service) fans each request out to the agents and puts their answers together. Ray is an
optional dependency (``api[fleet]``): nothing here is imported unless the setting is set.
"""
