"""/dev/sgx_enclave (placeholder until the enclave driver lands)."""

from __future__ import annotations

from vepc.kernel.mm import FileOps


class EnclaveDriver(FileOps):
    name = "sgx_enclave"

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def reclaim_pages(self) -> None:
        return None
