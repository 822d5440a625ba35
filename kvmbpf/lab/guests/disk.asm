; disk.asm -- a guest with an exactly known block I/O mix on its data disk, in ROUNDS rounds
; (0 = forever).  Each round waits DELAY_MS first (time for a tracer to attach after
; "KVMBPF:ready"), then, between "KVMBPF:begin" and "KVMBPF:end":
;   READS   single-sector reads  (int 13h AH=42h) of LBAs FIRST_LBA .. FIRST_LBA+READS-1
;   WRITES  single-sector writes (int 13h AH=43h) of the next WRITES LBAs
; one request at a time, so the host sees one request per sector and nothing merges.
; The drive is DISK_DRIVE (0x81: the lab's virtio-blk data disk).  A failed transfer prints
; "KVMBPF:error" and halts.  After the last round, "KVMBPF:done" and FINISH (0 halt, 1 spin).
%include "boot.inc"

BUFFER_SEG equ 0x2000           ; 0x20000: free conventional memory for the sector buffer

stage2:
        mark "ready"
        rounds_begin
        delay_ms DELAY_MS
        mark "begin"
        mov dword [dap_lba], FIRST_LBA
        times_ecx READS
        mov ah, 0x42
        call transfer
        end_times
        times_ecx WRITES
        mov ah, 0x43
        call transfer
        end_times
        mark "end"
        rounds_end
        finish

; transfer: one sector at [dap_lba] with int 13h function AH (42h read, 43h write), then
; advance dap_lba.  Preserves ECX and EBP.
transfer:
        push ecx
        push ebp
        mov word [dap_count], 1
        mov word [dap_buf_off], 0
        mov word [dap_buf_seg], BUFFER_SEG
        xor al, al              ; AH=43h: AL=0, write without verify
        mov dl, DISK_DRIVE
        mov si, dap
        int 0x13
        jc .fail
        inc dword [dap_lba]
        pop ebp
        pop ecx
        ret
.fail:
        mark "error"
        cli
.halt:  hlt
        jmp .halt

        align 4
dap:    db 0x10, 0              ; disk address packet: size, reserved
dap_count:   dw 1
dap_buf_off: dw 0
dap_buf_seg: dw BUFFER_SEG
dap_lba:     dd 0, 0
