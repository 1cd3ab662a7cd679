"""Where the node's TPMs are: the hardware TPM's device and the local vTPM's port.

Kept apart from the TPM stack (tpm2-pytss, about a second to import on a small machine):
deciding that a node without a TPM device is weak, and whether its vTPM listens, needs
only these addresses, and `status`, `selftest` and the vTPM unit's condition ask that often.
"""

from __future__ import annotations

from pathlib import Path

DEVICE = Path("/dev/tpmrm0")
DEVICE_TCTI = f"device:{DEVICE}"
VTPM_PORT = 2321  # statemesh-vtpm.service: swtpm's TPM port on 127.0.0.1 (control: +1)
VTPM_TCTI = f"swtpm:host=127.0.0.1,port={VTPM_PORT}"
