"""The node's runtime: the process that serves Flower's tasks with the hospital's installed ClientApp.

``supervisor`` (the node service: a SuperNode that runs no app, and the executor),
``executor`` (serves each task with the installed ClientApp, for allowed releases only),
``allowed_apps`` (the allow-list of app bundles, ``allowed_apps.toml``),
``rehearsal`` (how the same ClientApp finds a virtual hospital's rehearsal home on the
simulation engine, and why a real node never serves one).
Import-light: nothing here imports torch or pandas at module level.
"""

__all__: list[str] = []
