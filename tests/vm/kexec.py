"""kexec in a guest, as root would use it to start a kernel of its choosing with all of RAM."""

from __future__ import annotations

from harness.vm.driver import Guest

# Loads the guest's own kernel and initramfs for kexec (kexec_file_load, x86-64's call 320:
# kexec-tools is not installed); prints the call's result and errno.
KEXEC_LOAD = """import ctypes, glob, os
libc = ctypes.CDLL(None, use_errno=True)
kernel = os.open(sorted(glob.glob("/boot/vmlinuz-*"))[-1], os.O_RDONLY)
initrd = os.open(sorted(glob.glob("/boot/initrd.img-*"))[-1], os.O_RDONLY)
cmdline = b"console=ttyS0\\0"
print(libc.syscall(320, kernel, initrd, len(cmdline), cmdline, 0), ctypes.get_errno())
"""


def load_a_kernel_for_kexec(guest: Guest) -> str:
    """What kexec -l does: "0 0" when the kernel is loaded, "-1 1" when refused (EPERM)."""
    guest.put("/root/kexec-load.py", KEXEC_LOAD.encode())
    return guest.run("python3 /root/kexec-load.py", timeout=120).stdout.strip()
