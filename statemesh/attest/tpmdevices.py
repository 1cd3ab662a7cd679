"""Where the node's TPMs are: the hardware TPM's device and the local vTPM's socket.

Kept apart from the TPM stack (tpm2-pytss, about a second to import on a small machine):
deciding that a node without a TPM device is weak, and whether its vTPM listens, needs
only these addresses, and `status`, `selftest` and the vTPM unit's condition ask that often.
"""

from __future__ import annotations

from pathlib import Path

DEVICE = Path("/dev/tpmrm0")
DEVICE_TCTI = f"device:{DEVICE}"
# statemesh-vtpm.service: swtpm's command socket (its control socket: the same path with
# ".ctrl", where tpm2-tss looks for it). A unix socket in a directory only swtpm's user (the
# aTLS endpoint's user, statemesh-atls) and root can enter, not a TCP port on 127.0.0.1
# that any local user (a tenant's workload) can connect to: whoever reaches swtpm can reset
# the vTPM, or have its attestation key sign.
VTPM_SOCKET = Path("/run/statemesh-node/vtpm/tpm.sock")
VTPM_TCTI = f"swtpm:path={VTPM_SOCKET}"
