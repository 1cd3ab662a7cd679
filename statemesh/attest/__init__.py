"""Attestation: the TPM, its wire formats, the EK chain, evidence, and aTLS between nodes.

Layered bottom-up: refusals (the errors a verifier gives) and tpmwire (parsing) know
nothing else; tpm drives the device; ekchain, evidence, attester and verifier build on
them; atls carries evidence in the TLS handshake; endpoint is the operator-facing command
(`atls-serve`, `verify`). Nothing here knows the guarantees or the installation.
"""
