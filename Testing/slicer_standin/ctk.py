"""Stand-in for ``ctk``: empty on purpose (see ``qt.py``); the module only has to import."""
