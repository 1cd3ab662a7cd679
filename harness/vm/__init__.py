"""The VM harness: QEMU guests for the VM suite (tests/vm), `make demo` and bench.storage.

image builds and caches the guest images (guest/ holds the files installed into them),
driver boots and drives a guest, qmp saves and restores one, vtpm gives it a swtpm TPM,
snapshot keeps saved installed nodes, variants builds other versions of the package for
the upgrade tests, demo is `make demo`. Nothing here imports tests/.
"""
