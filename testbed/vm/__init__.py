"""Guests: from a spec to a running, SSH-reachable QEMU guest and back to nothing.

qemu (spec -> argv, pure: the one builder of every QEMU command line), process
(start, staged readiness, QMP, shutdown), dataplane (the private L2 segment: tap +
bridge as root, else QEMU's socket netdev), topology (receiver and sender booted
together), guest (the SSH connection, a `testbed.shell.Shell`), hostfacts (what
this host can do: KVM probed by booting, PMU, taps), cachemodel (guests with the
cache-model plugin, and micro guests).
"""
