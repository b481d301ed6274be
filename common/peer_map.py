"""The two node names of a pair, and which one is the other's peer."""

NODES = ("primary", "backup")
PEER = {"primary": "backup", "backup": "primary"}
