"""Entry points: remus-primary and remus-backup choose a host's first role and run
the role machine (common/node.py). This is the only package that knows both
sides' roles; it wires them together for the role changes that cross sides."""
