"""The node: configuration, CLI, client listener, ops HTTP app."""
