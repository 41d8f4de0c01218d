"""The hospital node: ClientApp, node home, dataset connectors and the `medfed node` CLI.

Import-light on purpose: Flower starts a fresh ClientApp process for every message,
so importing this package pulls in neither torch nor pandas. Import from the modules:
``errors`` (the NodeError tree), ``home`` (NodeHome, DatasetEntry), ``connectors``
(TabularConnector, InMemoryConnector, TabularData), ``client_app``, ``rounds``, ``cli``.
"""

__all__: list[str] = []
