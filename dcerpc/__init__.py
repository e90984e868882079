"""DCE/RPC wire codecs shared by every package of the project (no I/O, imports nothing of ours)."""
