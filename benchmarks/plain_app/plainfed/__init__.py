"""A plain Flower App: the FedAvg and empty-wave baselines of medfed's overhead benchmark."""

__all__: list[str] = []
