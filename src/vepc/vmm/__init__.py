"""The pure, side-effect-free QEMU pieces of the VMM: command line, guest layout, CPUID 0x12, QMP/HMP.

* ``vepc.vmm.options`` — ``parse_qemu_args`` -> ``QemuConfig`` (QEMU's option syntax and error lines);
* ``vepc.vmm.layout`` — ``build_layout`` -> ``GuestLayout`` (RAM split, EPC base and sections);
* ``vepc.vmm.cpuid`` — ``build_sgx_cpuid`` (leaf 7.0 SGX bits and leaf 0x12 as QEMU synthesises them);
* ``vepc.vmm.qmp`` — ``query_sgx``, ``query_sgx_capabilities``, ``hmp_info_sgx``;
* ``vepc.vmm.errors`` — ``QemuError`` (``str()`` is QEMU's stderr line).
"""
