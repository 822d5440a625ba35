; quiet.asm -- a known burst of QEMU-dispatched writes between two silent phases.
; After "KVMBPF:ready" the vCPU spins SPIN_COUNT x 2^20 iterations with interrupts
; off (~0.5 s each where the host emulates real mode, as PVM does): no userspace exits,
; so a tracer can attach while QEMU does nothing for this guest.
; Then, between "KVMBPF:begin" and "KVMBPF:end":
;   PIO_COUNT  byte writes to PIO_PORT   (one IO userspace exit each)
;   MMIO_COUNT byte writes to MMIO_ADDR  (one MMIO userspace exit each)
; then "KVMBPF:done" and halt with interrupts off (silent again).
%include "boot.inc"

stage2:
        enter_unreal
        mark "ready"
        cli
        mov ebx, SPIN_COUNT
        test ebx, ebx
        jz spun
spin:   mov ecx, 0x100000
.inner: dec ecx
        jnz .inner
        dec ebx
        jnz spin
spun:
        mark "begin"
        cld
        port_writes PIO_COUNT, PIO_PORT

        mov edi, MMIO_ADDR
        times_ecx MMIO_COUNT
        mov byte [fs:edi], 0x5a
        end_times
        mark "end"
        mark "done"
        finish
