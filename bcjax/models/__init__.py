"""Model adapters: load a backbone, build its head, expose a pure forward function."""
