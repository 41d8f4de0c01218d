"""An outsider's app: it must never run on a medfed node."""
