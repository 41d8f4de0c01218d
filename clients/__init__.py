"""Programs that run at the alliance's sites."""

__all__: list[str] = []
