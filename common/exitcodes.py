"""The daemons' exit codes: one table, for both daemons, systemd units and tests."""
EXIT_OK = 0
EXIT_FAILED = 1              # the guest could not be run (activation failed, guest crashed)
EXIT_USAGE = 2               # bad config, bad TLS material
EXIT_GUEST_FAILED = 3        # the primary's QEMU failed or died
EXIT_ACTIVATION_REFUSED = 4  # the replica is torn, stale or already activated
EXIT_STOOD_DOWN = 5          # a newer generation holds the guest on the other host
EXIT_UNDECIDED = 6           # cannot tell whether the other host runs the guest
