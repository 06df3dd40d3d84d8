"""The Linux SGX subsystem on the model: EPC pool, reclaimer, /dev/sgx_enclave, /dev/sgx_vepc,
/dev/sgx_provision, over processes, files and mappings. Runs as host or guest kernel alike."""

from vepc.kernel.kernel import Kernel, KernelConfig, SgxUnavailable

__all__ = ["Kernel", "KernelConfig", "SgxUnavailable"]
