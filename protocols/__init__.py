"""Contracts between the parts of cicada-async: storage backends, shard and plan types, errors,
and the V2 inference wire codec."""
