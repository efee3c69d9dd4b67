"""Privileged system calls, quarantined: namespaces, netlink, nftables, cgroups, mounts.

Nothing outside this package calls setns/mount/netlink/nft/cgroup writes directly
(tests/test_layering.py keeps it so).
"""
