"""The coordinator side: ServerApp, strategies, tracking and the wire contract.

Import-light on purpose: a hospital node imports ``federation.protocol`` and must pull
in neither MLflow nor the ServerApp.
"""

__all__: list[str] = []
