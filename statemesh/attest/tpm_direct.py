"""The TPM backend in pure Python: TPM 2.0 commands written and read by this module.

For where tpm2-pytss is not packaged (Ubuntu 22.04). The node needs ten commands, all
with empty authorisation values: password sessions, and one unsalted, unbound policy session
for the EK's PolicySecret(endorsement), whose use needs no HMAC. So there is no session key,
no parameter encryption and no response HMAC to verify; the commands go to the kernel's
resource manager (/dev/tpmrm0) or to the node's own swtpm over its socket (its user's alone).
Layouts follow TPM 2.0 Part 2 (structures) and Part 3 (commands); the templates are the
TCG EK Credential Profile's L-1 (RSA 2048) and L-2 (ECC P-256) and the AK template of
statemesh.attest.tpm_esapi, so both backends make the same keys.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import struct
import time
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

from statemesh.attest import tpmwire
from statemesh.attest.tpm import MAX_TRANSIENT, Tpm, TpmError
from statemesh.attest.tpmwire import (
    ALG_AES, ALG_CFB, ALG_ECC, ALG_ECDSA, ALG_NULL, ALG_RSA, ALG_SHA256, ECC_NIST_P256)

ST_NO_SESSIONS, ST_SESSIONS = 0x8001, 0x8002
RS_PW = 0x40000009
RH_NULL, RH_ENDORSEMENT = 0x40000007, 0x4000000B
CC_CREATE_PRIMARY = 0x131
CC_ACTIVATE_CREDENTIAL = 0x147
CC_NV_READ = 0x14E
CC_POLICY_SECRET = 0x151
CC_QUOTE = 0x158
CC_FLUSH_CONTEXT = 0x165
CC_NV_READ_PUBLIC = 0x169
CC_START_AUTH_SESSION = 0x176
CC_GET_CAPABILITY = 0x17A
CC_PCR_READ = 0x17E
CAP_HANDLES, CAP_TPM_PROPERTIES = 0x1, 0x6
PT_NV_BUFFER_MAX = 0x12C
HANDLE_RANGES = (0x80000000, 0x02000000, 0x03000000)  # transient, HMAC and policy sessions
SE_POLICY = 0x01
SESSION_CONTINUE = 0x01
# TPM_MAX_COMMAND_SIZE: 4096 on every TPM known here. A longer command is refused before it
# is sent: /dev/tpmrm0 refuses it too, and swtpm answers it twice, which would put every
# later answer on the connection one command late.
MAX_COMMAND = 4096
MAX_RESPONSE = 8192
HEADER = struct.Struct(">HII")
PCR_SELECT_BYTES = 3  # PCRs 0-23, as every PC-client TPM has
NV_CHUNK_FALLBACK = 512
# "Send it again": TPM_RC_YIELDED, TESTING and RETRY (swtpm answers RETRY to some ECC
# operations now and then); tpm2-tss's ESAPI resends as well.
RETRY_CODES = (0x908, 0x90A, 0x922)
RETRIES = 8
RETRY_PAUSE_SECONDS = 0.005  # doubled at each retry: about 1.3 s in all
DEVICE_TIMEOUT_SECONDS = 120  # an RSA EK's generation takes seconds on slow TPMs

# TCG EK Credential Profile 2.x: the EK certificates' NV indices, and where a TPM maker
# may have stored a nonce or a template of its own for the EK (honoured by tpm2-pytss,
# refused here: the EK would not be the one the certificate certifies).
EK_NV = ((0x01C00002, (0x01C00003, 0x01C00004)),  # RSA 2048: certificate, (nonce, template)
         (0x01C0000A, (0x01C0000B, 0x01C0000C)))  # ECC P-256
# The largest TPM2B_ID_OBJECT (an HMAC and a 64-byte credential, sized) and
# TPM2B_ENCRYPTED_SECRET (an RSA 4096 ciphertext) a TPM accepts: anything longer is not a
# credential, and is refused before it reaches the TPM.
MAX_CREDENTIAL_BLOB = 2 + 2 + 64 + 2 + 64
MAX_ENCRYPTED_SECRET = 2 + 512
EK_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
EK_ATTRIBUTES = (tpmwire.FIXED_TPM | tpmwire.FIXED_PARENT | tpmwire.SENSITIVE_DATA_ORIGIN
                 | tpmwire.ADMIN_WITH_POLICY | tpmwire.RESTRICTED | tpmwire.DECRYPT)
AK_ATTRIBUTES = (tpmwire.FIXED_TPM | tpmwire.FIXED_PARENT | tpmwire.SENSITIVE_DATA_ORIGIN
                 | tpmwire.USER_WITH_AUTH | tpmwire.RESTRICTED | tpmwire.SIGN)

# Format-one response codes (TPM 2.0 Part 2, table 16): the ones a caller can meet here.
FORMAT_ONE_ERRORS: Dict[int, str] = {
    0x01: "asymmetric", 0x02: "attributes", 0x03: "hash", 0x04: "value", 0x05: "hierarchy",
    0x07: "key size", 0x0A: "type", 0x0B: "handle", 0x0D: "range", 0x0E: "auth fail",
    0x0F: "nonce", 0x12: "scheme", 0x15: "size", 0x16: "symmetric", 0x18: "selector",
    0x1A: "insufficient", 0x1B: "signature", 0x1C: "key", 0x1D: "policy fail",
    0x1F: "integrity", 0x22: "bad auth", 0x26: "curve", 0x27: "ECC point",
}
FORMAT_ZERO_ERRORS: Dict[int, str] = {
    0x100: "not initialised", 0x101: "in failure mode", 0x143: "command code",
    0x902: "object memory", 0x903: "session memory", 0x908: "yielded", 0x922: "retry",
    0x90A: "testing", 0x921: "lockout", 0x901: "context gap",
}


def _template(key_type: int, attributes: int, policy: bytes, parameters: bytes,
              unique: bytes) -> bytes:
    return (struct.pack(">HHI", key_type, ALG_SHA256, attributes) + tpmwire.sized(policy)
            + parameters + unique)


_EK_SYMMETRIC = struct.pack(">HHH", ALG_AES, 128, ALG_CFB)
EK_RSA2048 = _template(ALG_RSA, EK_ATTRIBUTES, EK_POLICY,
                       _EK_SYMMETRIC + struct.pack(">HHI", ALG_NULL, 2048, 0),
                       tpmwire.sized(bytes(256)))
EK_ECC256 = _template(ALG_ECC, EK_ATTRIBUTES, EK_POLICY,
                      _EK_SYMMETRIC + struct.pack(">HHH", ALG_NULL, ECC_NIST_P256, ALG_NULL),
                      tpmwire.sized(bytes(32)) + tpmwire.sized(bytes(32)))
AK_TEMPLATE = _template(ALG_ECC, AK_ATTRIBUTES, b"",
                        struct.pack(">HHHHH", ALG_NULL, ALG_ECDSA, ALG_SHA256, ECC_NIST_P256, ALG_NULL),
                        tpmwire.sized(b"") + tpmwire.sized(b""))
EMPTY_SENSITIVE = tpmwire.sized(tpmwire.sized(b"") + tpmwire.sized(b""))  # TPM2B_SENSITIVE_CREATE: no auth, no data
PASSWORD_SESSION = struct.pack(">I", RS_PW) + tpmwire.sized(b"") + bytes([0]) + tpmwire.sized(b"")


class TpmResponseError(TpmError):
    """The TPM answered a command with an error code."""

    def __init__(self, what: str, code: int):
        super().__init__(f"TPM {what} failed: {describe(code)}")
        self.code = code

    @property
    def no_such_handle(self) -> bool:
        return bool(self.code & 0x80) and self.code & 0x3F == 0x0B


def describe(code: int) -> str:
    """A response code as a person can read it: its name and what it refers to."""
    if code & 0x80:  # format one: an error tied to a handle, session or parameter
        name = FORMAT_ONE_ERRORS.get(code & 0x3F, "error")
        number = code >> 8 & 0x7
        if code & 0x40:
            where = f"parameter {code >> 8 & 0xF}"
        elif code & 0x800:
            where = f"session {number}"
        else:
            where = f"handle {number}"
        return f"{name} ({where}; response code {code:#x})"
    return f"{FORMAT_ZERO_ERRORS.get(code, 'error')} (response code {code:#x})"


def pcr_selection(pcrs: Sequence[int]) -> bytes:
    """A TPML_PCR_SELECTION of SHA-256 PCRs."""
    bitmap = bytearray(PCR_SELECT_BYTES)
    for pcr in pcrs:
        if not 0 <= pcr < PCR_SELECT_BYTES * 8:
            raise TpmError(f"PCR {pcr} is outside 0-{PCR_SELECT_BYTES * 8 - 1}")
        bitmap[pcr // 8] |= 1 << pcr % 8
    return struct.pack(">IHB", 1, ALG_SHA256, PCR_SELECT_BYTES) + bytes(bitmap)


def command(code: int, handles: Sequence[int] = (), sessions: Sequence[bytes] = (),
            parameters: bytes = b"") -> bytes:
    """A whole TPM command: header, handles, the authorisation area if any, parameters."""
    body = b"".join(struct.pack(">I", handle) for handle in handles)
    if sessions:
        area = b"".join(sessions)
        body += struct.pack(">I", len(area)) + area
    body += parameters
    if HEADER.size + len(body) > MAX_COMMAND:
        raise TpmError(f"a {HEADER.size + len(body)}-byte command is longer than a TPM takes")
    tag = ST_SESSIONS if sessions else ST_NO_SESSIONS
    return HEADER.pack(tag, HEADER.size + len(body), code) + body


def response(raw: bytes, what: str, handles: int = 0) -> Tuple[List[int], tpmwire.Reader]:
    """The handles and a reader over the parameters of a successful response. The
    response's authorisation area is left unread: password and unbound policy sessions
    carry no HMAC in it."""
    if len(raw) < HEADER.size:
        raise TpmError(f"TPM {what} failed: a {len(raw)}-byte response")
    tag, size, code = HEADER.unpack_from(raw)
    if code:
        raise TpmResponseError(what, code)
    if size != len(raw):
        raise TpmError(f"TPM {what} failed: the response says {size} bytes, {len(raw)} came")
    reader = tpmwire.Reader(raw[HEADER.size:], f"the {what} response")
    found = [reader.u32() for _ in range(handles)]
    if tag == ST_SESSIONS:
        return found, tpmwire.Reader(reader.take(reader.u32()), f"the {what} response")
    return found, reader


class Transport(Protocol):
    def transact(self, command_bytes: bytes) -> bytes: ...

    def close(self) -> None: ...


class DeviceTransport:
    """A TPM character device: one write of the command, one read of the response."""

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def transact(self, command_bytes: bytes) -> bytes:
        os.write(self._fd, command_bytes)
        return os.read(self._fd, MAX_RESPONSE)

    def close(self) -> None:
        os.close(self._fd)


class SocketTransport:
    """swtpm's data channel: raw commands and responses over one stream connection. A
    connection that failed mid-command (a timeout, a closed or garbled answer) is closed
    and the next command opens another: an answer left unread on it would otherwise be
    taken for the next command's. swtpm has no resource manager, so the objects this
    connection made outlive it."""

    def __init__(self, family: int, address: object):
        self._family, self._address = family, address
        self._socket: Optional[socket.socket] = self._connect()

    def _connect(self) -> socket.socket:
        connection = socket.socket(self._family, socket.SOCK_STREAM)
        connection.settimeout(DEVICE_TIMEOUT_SECONDS)
        try:
            connection.connect(self._address)
        except OSError:
            connection.close()
            raise
        return connection

    def _receive(self, connection: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = connection.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the TPM closed the connection")
            data += chunk
        return data

    def transact(self, command_bytes: bytes) -> bytes:
        connection = self._socket or self._connect()
        self._socket = None
        try:
            connection.sendall(command_bytes)
            header = self._receive(connection, HEADER.size)
            size = HEADER.unpack(header)[1]
            if not HEADER.size <= size <= MAX_RESPONSE:
                raise ConnectionError(f"a response of {size} bytes")
            answer = header + self._receive(connection, size - HEADER.size)
        except BaseException:
            connection.close()
            raise
        self._socket = connection  # kept only once the whole answer was read
        return answer

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def open_transport(tcti: str) -> Transport:
    """The two TCTIs the node uses, in tpm2-tss's spelling: "device:PATH" and
    "swtpm:path=SOCKET" (or "swtpm:host=H,port=P", as the tests' unreachable TPM)."""
    kind, _, configuration = tcti.partition(":")
    if kind == "device":
        return DeviceTransport(configuration or "/dev/tpmrm0")
    if kind == "swtpm":
        options = dict(part.partition("=")[::2] for part in configuration.split(",") if part)
        if "path" in options:
            return SocketTransport(socket.AF_UNIX, options["path"])
        return SocketTransport(socket.AF_INET, (options.get("host", "127.0.0.1"),
                                                int(options.get("port", "2321"))))
    raise ValueError("the direct backend opens device: and swtpm: TCTIs only")


class DirectTpm(Tpm):
    """One open TPM connection, its commands written here."""

    backend = "direct"
    library_errors = (OSError, tpmwire.TpmWireError)

    def __init__(self, tcti: str):
        super().__init__(tcti)
        try:
            self._transport = open_transport(tcti)
        except (OSError, ValueError) as error:
            raise TpmError(f"cannot open the TPM at {tcti}: {error}") from None

    def _run(self, what: str, code: int, handles: Sequence[int] = (),
             sessions: Sequence[bytes] = (), parameters: bytes = b"",
             out_handles: int = 0) -> Tuple[List[int], tpmwire.Reader]:
        sent = command(code, handles, sessions, parameters)
        for attempt in range(RETRIES):
            try:
                return response(self._transport.transact(sent), what, out_handles)
            except TpmResponseError as error:
                if error.code not in RETRY_CODES:
                    raise
            time.sleep(RETRY_PAUSE_SECONDS * 2 ** attempt)
        return response(self._transport.transact(sent), what, out_handles)

    def _disconnect(self) -> None:
        self._transport.close()

    def _flush(self, handle: int) -> None:
        self._run("flush", CC_FLUSH_CONTEXT, parameters=struct.pack(">I", handle))

    def _loaded_handles(self, first: int) -> List[int]:
        parameters = struct.pack(">III", CAP_HANDLES, first, MAX_TRANSIENT)
        _, reader = self._run("handle listing", CC_GET_CAPABILITY, parameters=parameters)
        reader.u8()  # moreData: MAX_TRANSIENT is more than any TPM holds
        reader.u32()  # the capability asked for
        return [reader.u32() for _ in range(reader.u32())]

    def _flush_transient_objects(self) -> int:
        handles = {handle for first in HANDLE_RANGES for handle in self._loaded_handles(first)}
        for handle in sorted(handles):
            self._flush(handle)
        return len(handles)

    def _nv_size(self, index: int) -> Optional[int]:
        """The size of an NV index's data, or None where the index is not defined."""
        try:
            _, reader = self._run("NV read", CC_NV_READ_PUBLIC, handles=(index,))
        except TpmResponseError as error:
            if error.no_such_handle:
                return None
            raise
        public = tpmwire.Reader(reader.sized(256), "TPMS_NV_PUBLIC")
        public.u32(), public.u16(), public.u32(), public.sized(64)  # index, nameAlg, attributes, policy
        return public.u16()

    def _nv_chunk(self) -> int:
        parameters = struct.pack(">III", CAP_TPM_PROPERTIES, PT_NV_BUFFER_MAX, 1)
        _, reader = self._run("property read", CC_GET_CAPABILITY, parameters=parameters)
        reader.u8(), reader.u32()
        if reader.u32() and reader.u32() == PT_NV_BUFFER_MAX:
            return reader.u32() or NV_CHUNK_FALLBACK
        return NV_CHUNK_FALLBACK

    def _nv_read(self, index: int, size: int) -> bytes:
        """An EK certificate index's data, read with the index's own (empty) authorisation
        (TPMA_NV_AUTHREAD, which the EK Credential Profile sets), as tpm2-pytss reads it."""
        chunk, data = self._nv_chunk(), b""
        while len(data) < size:
            wanted = min(chunk, size - len(data))
            _, reader = self._run("EK certificate read", CC_NV_READ, (index, index),
                                  (PASSWORD_SESSION,), struct.pack(">HH", wanted, len(data)))
            chunk_read = reader.sized(wanted)
            if not chunk_read:
                raise TpmError(f"NV {index:#x}: the TPM read nothing at offset {len(data)}")
            data += chunk_read
        return data

    def _find_certificate(self) -> Tuple[Optional[bytes], bytes]:
        for (certificate_index, makers_indices), template in zip(EK_NV, (EK_RSA2048, EK_ECC256)):
            size = self._nv_size(certificate_index)
            if not size:
                continue
            for index in makers_indices:
                if self._nv_size(index) is not None:
                    raise TpmError(
                        f"this TPM's EK is made with its maker's data (NV {index:#x}), "
                        "which only the tpm2-pytss backend (python3-tpm2-pytss) reads")
            return self._nv_read(certificate_index, size), template
        return None, EK_RSA2048

    def _create_primary(self, template: bytes) -> Tuple[int, bytes]:
        parameters = EMPTY_SENSITIVE + tpmwire.sized(template) + tpmwire.sized(b"") + struct.pack(">I", 0)
        (handle,), reader = self._run("key creation", CC_CREATE_PRIMARY, (RH_ENDORSEMENT,),
                                      (PASSWORD_SESSION,), parameters, out_handles=1)
        try:
            return handle, reader.sized(1024)  # TPM2B_PUBLIC: the TPMT_PUBLIC inside
        except tpmwire.TpmWireError:
            with contextlib.suppress(TpmError, OSError):
                self._flush(handle)
            raise

    def _ak_template(self) -> bytes:
        return AK_TEMPLATE

    def _read_pcrs(self, batch: Sequence[int]) -> List[bytes]:
        _, reader = self._run("PCR read", CC_PCR_READ, parameters=pcr_selection(batch))
        reader.u32()  # pcrUpdateCounter
        selected = tpmwire.parse_pcr_selection(reader)
        digests = [reader.sized(64) for _ in range(reader.u32())]
        if selected != (tpmwire.PcrSelection(ALG_SHA256, tuple(batch)),) or len(digests) != len(batch):
            raise TpmError(f"the TPM read PCRs {selected}, not SHA-256 PCRs {tuple(batch)}")
        return digests

    def _quote(self, handle: int, pcrs: Sequence[int], data: bytes) -> Tuple[bytes, bytes]:
        parameters = tpmwire.sized(data) + struct.pack(">H", ALG_NULL) + pcr_selection(pcrs)
        _, reader = self._run("quote", CC_QUOTE, (handle,), (PASSWORD_SESSION,), parameters)
        attest = reader.sized(4096)
        return attest, reader.rest()  # the TPMT_SIGNATURE

    def _policy_session(self) -> int:
        parameters = (tpmwire.sized(secrets.token_bytes(32)) + tpmwire.sized(b"")
                      + struct.pack(">BHH", SE_POLICY, ALG_NULL, ALG_SHA256))
        (session,), _ = self._run("policy session start", CC_START_AUTH_SESSION,
                                  (RH_NULL, RH_NULL), parameters=parameters, out_handles=1)
        return session

    def _activate(self, blob: bytes, secret: bytes) -> bytes:
        for name, value, limit in (("credential blob", blob, MAX_CREDENTIAL_BLOB),
                                   ("encrypted secret", secret, MAX_ENCRYPTED_SECRET)):
            if len(value) > limit:
                raise ValueError(f"a {len(value)}-byte {name} is longer than any TPM takes")
            if len(value) < 2 or struct.unpack(">H", value[:2])[0] != len(value) - 2:
                raise ValueError(f"the {name} is not one sized TPM buffer")
        ek_handle, _ = self._endorsement()
        ak_handle, _ = self._attestation()
        # The EK's policy is PolicySecret(endorsement hierarchy) in the default templates.
        session = self._policy_session()
        try:
            self._run("policy", CC_POLICY_SECRET, (RH_ENDORSEMENT, session), (PASSWORD_SESSION,),
                      tpmwire.sized(b"") * 3 + struct.pack(">i", 0))
            policy_auth = (struct.pack(">I", session) + tpmwire.sized(secrets.token_bytes(32))
                           + bytes([SESSION_CONTINUE]) + tpmwire.sized(b""))
            _, reader = self._run("credential activation", CC_ACTIVATE_CREDENTIAL,
                                  (ak_handle, ek_handle), (PASSWORD_SESSION, policy_auth),
                                  blob + secret)
            return reader.sized(64)
        finally:
            with contextlib.suppress(TpmError, OSError):
                self._flush(session)
