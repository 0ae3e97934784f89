"""Persistence and inter-node transport: stores, the write-behind queue, the bus."""
