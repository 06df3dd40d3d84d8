/*
 * The real KVM guest of vepc.realkvm: flat 64-bit code, loaded at GUEST_CODE and entered directly in long
 * mode through KVM_SET_SREGS (real-kvm.md). Every job runs at CPL3 (CS 0x33, IOPL 3), where the PVM-variant
 * KVM of the CI machines runs guest code natively; guest ring 0 is run through an instruction emulator
 * (~1 M instructions/s), so only the exception stubs and `halt0` are ring-0 code.
 *
 * Entry registers (set by the VMM with KVM_SET_REGS): RDI = argument block (guest-physical, identity
 * mapped), RSI = vCPU index, RSP = this vCPU's stack.
 *
 * Paravirtual ports (`out %al, $imm8`; the VMM reads and writes the full registers with KVM_GET/SET_REGS):
 *   PORT_DONE      job finished: RAX = result, RBX/RCX = details
 *   PORT_ENCLS     ENCLS: RAX = leaf, RBX/RCX/RDX = operands (guest addresses); returns RAX and RFLAGS as
 *                  ENCLS would, or RAX = trapnr | 0x40000000 when the leaf faulted (encoding of the kernel's
 *                  __encls_ret_N after its exception fixup, arch/x86/kernel/cpu/sgx/encls.h)
 *   PORT_MRENCLAVE RBX = SECS page (EPC, guest-physical), RCX = 32-byte buffer: the VMM copies SECS.MRENCLAVE
 *                  as the model's EINIT wrote it; RAX = 0, or -1 when RBX is not an initialized SECS
 *   PORT_MARK      AL = 1 before a timed loop, AL = 2 after it
 *   PORT_TICK      nothing: one exit to the VMM and back (touch mode 2, the benchmark's bare-exit reference)
 *   PORT_EXCEPTION (ring 0) RAX = vector, RBX = error code, RCX = faulting RIP, RDX = CR2
 */
        .set PORT_DONE, 0xE0
        .set PORT_ENCLS, 0xE1
        .set PORT_MRENCLAVE, 0xE2
        .set PORT_MARK, 0xE3
        .set PORT_TICK, 0xE4
        .set PORT_EXCEPTION, 0xEF

        .set OP_END, 0
        .set OP_ECREATE, 1
        .set OP_EADD, 2
        .set OP_EEXTEND, 3
        .set OP_EINIT, 4

        .set ECREATE, 0x0
        .set EADD, 0x1
        .set EINIT, 0x2
        .set EEXTEND, 0x6

        .macro ENCLS
        out     %al, $PORT_ENCLS
        .endm

        .text
        .code64

/*
 * touch: one access per page over [base, base + count * stride).
 * Argument block: +0 base, +8 count, +16 stride, +24 mode.
 *   mode 0: write a marker into each page (the benchmark loop: one first-touch write per page)
 *   mode 1: read the first qword, count pages where it is not all-ones (EPC read from outside an enclave
 *           returns the abort page, 0xFF bytes), then write the marker
 *   mode 2: write the marker, then exit to the VMM through PORT_TICK (one bare exit per page)
 * Result: RAX = pages whose first read was not all-ones (mode 1), RBX = pages touched.
 */
        .globl  touch
touch:
        mov     0(%rdi), %rbx
        mov     8(%rdi), %rcx
        mov     16(%rdi), %rdx
        mov     24(%rdi), %r8
        mov     %rcx, %r11
        xor     %r9, %r9
        movabs  $0x5a5a5a5a5a5a5a5a, %r10
        mov     $1, %al
        out     %al, $PORT_MARK
        test    %rcx, %rcx
        jz      3f
        cmp     $2, %r8
        je      5f
        test    %r8, %r8
        jnz     2f
1:      mov     %r10, (%rbx)
        add     %rdx, %rbx
        dec     %rcx
        jnz     1b
        jmp     3f
2:      mov     (%rbx), %rax
        cmp     $-1, %rax
        je      4f
        inc     %r9
4:      mov     %r10, (%rbx)
        add     %rdx, %rbx
        dec     %rcx
        jnz     2b
        jmp     3f
5:      mov     %r10, (%rbx)
        out     %al, $PORT_TICK
        add     %rdx, %rbx
        dec     %rcx
        jnz     5b
3:      mov     $2, %al
        out     %al, $PORT_MARK
        mov     %r9, %rax
        mov     %r11, %rbx
        out     %al, $PORT_DONE
        jmp     .

/*
 * load_enclave: build an enclave from an op list with ECREATE/EADD/EEXTEND/EINIT through PORT_ENCLS, as a
 * guest kernel's loader would, then ask for MRENCLAVE.
 * Argument block: +0 SECS page (EPC), +8 op list, +16 PAGEINFO scratch (32-byte aligned), +24 MRENCLAVE
 * buffer. Ops are 32 bytes {kind, a, b, c}:
 *   OP_ECREATE a = SECS source page, b = SECINFO          -> ENCLS[ECREATE](PAGEINFO{0, a, b, 0}, SECS)
 *   OP_EADD    a = LINADDR, b = source page, c = SECINFO  -> ENCLS[EADD](PAGEINFO{a, b, c, SECS}, next EPC page)
 *   OP_EEXTEND a = chunk offset in the last EADDed page   -> ENCLS[EEXTEND](_, page + a)
 *   OP_EINIT   a = SIGSTRUCT, b = EINITTOKEN              -> ENCLS[EINIT](a, SECS, b)
 * EPC pages are taken in order after the SECS page.
 * Result: RAX = 0 and RBX = the MRENCLAVE buffer; or RAX = the failing ENCLS's RAX (or -1 for a failed
 * MRENCLAVE query), RBX = op index, RCX = op kind.
 */
        .globl  load_enclave
load_enclave:
        mov     0(%rdi), %r12           /* SECS page */
        mov     8(%rdi), %r14           /* current op */
        mov     16(%rdi), %r15          /* PAGEINFO scratch */
        mov     %r12, %r13              /* last EPC page used */
        xor     %rbp, %rbp              /* op index */
        push    %rdi
.Lop:
        mov     0(%r14), %rax
        cmp     $OP_END, %rax
        je      .Lend
        cmp     $OP_ECREATE, %rax
        je      .Lecreate
        cmp     $OP_EADD, %rax
        je      .Leadd
        cmp     $OP_EEXTEND, %rax
        je      .Leextend
        cmp     $OP_EINIT, %rax
        je      .Leinit
        mov     $-2, %rax               /* unknown op */
        jmp     .Lfail
.Lecreate:
        movq    $0, 0(%r15)
        mov     8(%r14), %rax
        mov     %rax, 8(%r15)
        mov     16(%r14), %rax
        mov     %rax, 16(%r15)
        movq    $0, 24(%r15)
        mov     %r15, %rbx
        mov     %r12, %rcx
        mov     $ECREATE, %eax
        ENCLS
        jmp     .Lcheck
.Leadd:
        mov     8(%r14), %rax
        mov     %rax, 0(%r15)
        mov     16(%r14), %rax
        mov     %rax, 8(%r15)
        mov     24(%r14), %rax
        mov     %rax, 16(%r15)
        mov     %r12, 24(%r15)
        add     $4096, %r13
        mov     %r15, %rbx
        mov     %r13, %rcx
        mov     $EADD, %eax
        ENCLS
        jmp     .Lcheck
.Leextend:
        xor     %rbx, %rbx
        mov     %r13, %rcx
        add     8(%r14), %rcx
        mov     $EEXTEND, %eax
        ENCLS
        jmp     .Lcheck
.Leinit:
        mov     8(%r14), %rbx
        mov     %r12, %rcx
        mov     16(%r14), %rdx
        mov     $EINIT, %eax
        ENCLS
.Lcheck:
        test    %rax, %rax
        jnz     .Lfail
        add     $32, %r14
        inc     %rbp
        jmp     .Lop
.Lend:
        pop     %rdi
        mov     %r12, %rbx
        mov     24(%rdi), %rcx
        xor     %eax, %eax
        out     %al, $PORT_MRENCLAVE
        test    %rax, %rax
        jnz     .Lfail
        mov     24(%rdi), %rbx
        out     %al, $PORT_DONE
        jmp     .
.Lfail:
        mov     %rbp, %rbx
        mov     0(%r14), %rcx
        out     %al, $PORT_DONE
        jmp     .

/* spin: loop forever at CPL3 (exercises the VMM's bounded run: timeout, then a signal kicks KVM_RUN). */
        .globl  spin
spin:
        pause
        jmp     spin

/* fault: take #UD at CPL3 (exercises the exception path). */
        .globl  fault
fault:
        ud2

/* halt0: ring-0 entry that halts (KVM_EXIT_HLT). */
        .globl  halt0
halt0:
        hlt
        jmp     halt0

/*
 * Exception stubs (ring 0, emulated): 32 entries of 16 bytes from exc_base; vector n at exc_base + 16 * n.
 * The CPU pushed SS, RSP, RFLAGS, CS, RIP and, for 8, 10-14, 17, 21, 29, 30, an error code.
 */
        .macro EXC n
        .balign 16
        .if (\n == 8) || (\n >= 10 && \n <= 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
        push    $\n
        .else
        push    $0
        push    $\n
        .endif
        jmp     exc_common
        .endm

        .balign 16
        .globl  exc_base
exc_base:
        .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        EXC     \n
        .endr

exc_common:
        pop     %rax                    /* vector */
        pop     %rbx                    /* error code */
        mov     0(%rsp), %rcx           /* RIP */
        mov     %cr2, %rdx
        out     %al, $PORT_EXCEPTION
1:      hlt
        jmp     1b
