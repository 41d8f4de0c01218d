"""The officer's web console: budgets, requests, decisions and the audit trail of one node, in a browser."""

__all__ = ["accounts", "app", "chart", "cli", "sessions"]
