"""The Hub/cache adapter: the only package that talks to the Hub (``huggingface_hub``, ``hf_xet``
and their HTTP client) and changes the cache on disk. A lint rule (ruff's banned-api, TID251)
keeps those imports here.

- ``adapter``: ``HubCacheBackend``, the ``HubBackend`` the manager is given; worker processes,
  retries, the plan (the revision's file list).
- ``worker``: ``python -m api.models.hub.worker``, one download attempt in a process of its own.
- ``protocol``: the messages between the two, typed.
- ``classify``: a library error to a failure kind, a retry decision and a plain message.
- ``guard``: every answer of the Hub checked before the library uses it.
- ``cache``: the cache on disk: state, verification, the journal, deletion, orphans, locks.

Kept free of imports: the worker starts from here and must start fast.
"""
