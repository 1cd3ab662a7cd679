"""Test machinery shared by tests/ and bench/: never shipped in the package.

swtpm runs a software TPM for the attestation tests and benchmarks; private_devpts runs a
function in a private mount namespace with its own devpts instance; watchdog_scenarios
drives the real watchdog there; vm is the QEMU VM harness (guest images, the guest driver,
saved installed nodes) of the VM suite, `make demo` and bench.storage. bench/ imports
these, never tests/.
"""
