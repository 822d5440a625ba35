; exits.asm -- a guest with an exactly known exit mix, in ROUNDS rounds (0 = forever).
; Each round, between "KVMBPF:begin" and "KVMBPF:end":
;   PIO_COUNT   byte writes to PIO_PORT   (a port QEMU handles: one kvm_pio + one IO userspace exit each)
;   PIC_COUNT   byte writes to port 0x21  (the in-kernel PIC's mask register, rewritten unchanged:
;               one kvm_pio each, no userspace exit)
;   MMIO_COUNT  byte writes to MMIO_ADDR  (unassigned guest-physical address in the PCI hole: one
;               kvm_mmio and one MMIO userspace exit each)
;   CPUID_COUNT cpuid instructions
;   CR0_COUNT   round trips real -> protected -> real mode (two CR0 writes each)
; then waits DELAY_MS and starts the next round.  After the last, FINISH (0 halt, 1 spin).
%include "boot.inc"

stage2:
        enter_unreal
        mark "ready"
        rounds_begin
        mark "begin"
        cld
        port_writes PIO_COUNT, PIO_PORT

        in al, 0x21
        mov bl, al
        times_ecx PIC_COUNT
        mov al, bl
        out 0x21, al
        end_times

        mov edi, MMIO_ADDR
        times_ecx MMIO_COUNT
        mov byte [fs:edi], 0x5a
        end_times

        times_ecx CPUID_COUNT
        push ecx
        xor eax, eax
        cpuid
        pop ecx
        end_times

        cli
        times_ecx CR0_COUNT
        mov eax, cr0
        or al, 1
        mov cr0, eax
        and al, 0xfe
        mov cr0, eax
        end_times
        sti

        mark "end"
        delay_ms DELAY_MS
        rounds_end
        finish
