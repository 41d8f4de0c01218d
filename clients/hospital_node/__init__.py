"""The hospital node: ClientApp, node home, dataset connectors and the `medfed node` CLI.

Import-light on purpose: Flower starts a fresh ClientApp process for every message,
so importing this package pulls in neither torch nor pandas. Import from the modules:
``errors`` (the NodeError tree), ``home`` (NodeHome, DatasetEntry), ``connectors``
(TabularConnector, InMemoryConnector, TabularData), ``imaging_connector`` (DICOM folders
to one de-identified image per patient), ``client_app``, ``rounds``, ``study_round`` (a
statistics study's admission and noisy answer), ``cli``,
``audit_cli`` (`medfed node audit`), ``privacy_check`` (one-run auditing of a run's DP-SGD
on the node's data; `medfed node privacy-check` in ``privacy_check_cli``), ``pending_view``
(a request in words, for the CLI and the console), ``console`` (the officer's web console,
`medfed node console`).
"""

__all__: list[str] = []
