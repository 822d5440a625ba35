; net.asm -- a polled legacy virtio-net driver with an exactly known packet workload.
; The NIC is QEMU's virtio-net-pci with disable-modern=on (legacy I/O-port interface).
; After "ready" (NIC found and initialised) the guest:
;   GO_WAIT=1: waits (up to 60 s) for one Ethernet frame of type 0x88b5 ("go"), so a tracer
;              can attach before anything is sent;
;   runs DHCP: DHCPDISCOVER (broadcast flag set; up to 3 tries, ~6 s each) until an OFFER,
;              then DHCPREQUEST for the offered address until the ACK;
;   each round, between "begin" and "end": UDP_COUNT UDP datagrams with UDP_LEN payload bytes
;              from its leased address to the DHCP server's address (the lab's gateway), port
;              UDP_PORT (closed there by default: the host drops them as NO_SOCKET);
;   then DELAY_MS, ROUNDS rounds (0 = forever), "done", FINISH.
; Markers: ready, go|go-timeout, dhcp-discover (per try), dhcp-offer, dhcp-request, dhcp-ack
; (or dhcp-failed), begin, end, done.  Every frame starts with the 10-byte virtio_net_hdr.
; Received frames are only parsed while waiting for go/DHCP; otherwise the 16 RX buffers are
; recycled after each round.  After "done" nothing is recycled: once 16 frames have arrived the
; device stops taking frames and the host's tap queue fills up (the overrun scenario).
%include "boot.inc"

%define VSEG    0x1000          ; segment of everything the device reads or writes (linear 0x10000)
%define RXQ     0x0000          ; RX virtqueue: descriptors, avail at +0x1000, used at +0x2000
%define TXQ     0x3000          ; TX virtqueue, same layout
%define AVAIL   0x1000
%define USED    0x2000
%define QSIZE   256             ; legacy queues have the device's size; QEMU's is 256
%define NRX     16
%define RXBUF   0x6000          ; NRX buffers of BUFSZ bytes
%define BUFSZ   0x800
%define TXBUF   0xe000
%define VIO_GUEST_F 0x04        ; legacy virtio-pci registers (BAR0 I/O space)
%define VIO_PFN     0x08
%define VIO_QNUM    0x0c
%define VIO_QSEL    0x0e
%define VIO_NOTIFY  0x10
%define VIO_STATUS  0x12
%define VIO_MAC     0x14        ; device config (no MSI-X enabled)
%define REPLY_TICKS 110         ; ~6 s of 18.2 Hz BIOS ticks
%define GO_TICKS    1092        ; ~60 s
%define TX_TICKS    37          ; ~2 s
%define DHCP_FRAME  352         ; 10 hdr + 14 eth + 20 ip + 8 udp + 300 bootp
%define UDP_FRAME   (10 + 14 + 20 + 8 + UDP_LEN)
%define SWAP16(x)   ((((x) & 0xff) << 8) | (((x) >> 8) & 0xff))
%if UDP_LEN < 18 || UDP_FRAME > BUFSZ
%error "UDP_LEN must be 18..1472 (a minimal Ethernet frame, one buffer)"
%endif

stage2:
        cld
        call find_nic
        call init_nic
        mark "ready"
%if GO_WAIT
        call wait_go
%endif
        mov byte [tries], 3
.discover:
        mov byte [msgtype], 1
        call build_dhcp
        call send_frame
        mark "dhcp-discover"
        mov al, 2
        call wait_reply
        jnc .offer
        dec byte [tries]
        jnz .discover
        jmp dhcp_failed
.offer: mark "dhcp-offer"
        mov byte [msgtype], 3
        call build_dhcp
        call send_frame
        mark "dhcp-request"
        mov al, 5
        call wait_reply
        jc dhcp_failed
        mark "dhcp-ack"
        call build_udp
        rounds_begin
        mark "begin"
        times_ecx UDP_COUNT
        push ecx
        mov cx, UDP_FRAME
        call send_frame
        pop ecx
        end_times
        mark "end"
        call rx_drain
        delay_ms DELAY_MS
        rounds_end
stop:   finish
dhcp_failed:
        mark "dhcp-failed"
        jmp stop

; ---- PCI and device setup -------------------------------------------------------------
; find_nic: bus 0 scan for 1af4:1000; enable I/O + bus mastering; iobase = BAR0.
find_nic:
        xor ebx, ebx
.scan:  mov eax, ebx
        shl eax, 11
        or eax, 0x80000000
        mov dx, 0xcf8
        out dx, eax
        mov dx, 0xcfc
        in eax, dx
        cmp eax, 0x10001af4
        je .found
        inc bx
        cmp bx, 32
        jb .scan
        mark "no-nic"
        jmp stop
.found: shl ebx, 11
        or ebx, 0x80000000
        lea eax, [ebx + 4]              ; command register
        mov dx, 0xcf8
        out dx, eax
        mov dx, 0xcfc
        in ax, dx
        or ax, 5                        ; I/O space + bus master
        out dx, ax
        lea eax, [ebx + 0x10]           ; BAR0
        mov dx, 0xcf8
        out dx, eax
        mov dx, 0xcfc
        in eax, dx
        and ax, 0xfffc
        mov [iobase], ax
        ret

; io_port: DX = iobase + AX
%macro io_port 1
        mov dx, [iobase]
        add dx, %1
%endmacro

; init_nic: reset, ACK|DRIVER, no features, both queues, RX buffers posted, DRIVER_OK.
init_nic:
        io_port VIO_STATUS
        xor al, al
        out dx, al
        mov al, 1
        out dx, al
        mov al, 3
        out dx, al
        io_port VIO_GUEST_F
        xor eax, eax
        out dx, eax
        io_port VIO_MAC
        mov di, mac
        mov cx, 6
.mac:   in al, dx
        mov [di], al
        inc di
        inc dx
        loop .mac
        mov ax, VSEG
        mov es, ax
        xor di, di
        xor eax, eax
        mov cx, 0x4000
        rep stosd                       ; zero the whole 64 KiB segment
        xor ax, ax
        mov bx, (VSEG * 16 + RXQ) >> 12
        call setup_queue
        mov ax, 1
        mov bx, (VSEG * 16 + TXQ) >> 12
        call setup_queue
        xor bx, bx
.rx:    mov di, bx
        shl di, 4
        mov ax, bx
        shl ax, 11
        add ax, RXBUF
        movzx eax, ax
        add eax, VSEG * 16
        mov [es:RXQ + di], eax
        mov dword [es:RXQ + di + 8], BUFSZ
        mov word [es:RXQ + di + 12], 2  ; VRING_DESC_F_WRITE
        mov di, bx
        shl di, 1
        mov [es:RXQ + AVAIL + 4 + di], bx
        inc bx
        cmp bx, NRX
        jb .rx
        mov [rx_avail], bx
        mov [es:RXQ + AVAIL + 2], bx
        mov word [es:RXQ + AVAIL], 1    ; VRING_AVAIL_F_NO_INTERRUPT: we poll
        mov word [es:TXQ + AVAIL], 1
        io_port VIO_STATUS
        mov al, 7                       ; ACK | DRIVER | DRIVER_OK
        out dx, al
        io_port VIO_NOTIFY
        xor ax, ax
        out dx, ax
        ret

; setup_queue: AX = queue index, BX = page frame number of its ring.
setup_queue:
        io_port VIO_QSEL
        out dx, ax
        io_port VIO_QNUM
        in ax, dx
        cmp ax, QSIZE
        jne .bad
        io_port VIO_PFN
        movzx eax, bx
        out dx, eax
        ret
.bad:   mark "bad-queue-size"
        jmp stop

; ---- transmit ----------------------------------------------------------------------------
; send_frame: post TXBUF (CX bytes incl. the virtio header) as TX descriptor 0, notify, wait.
send_frame:
        mov dword [es:TXQ], VSEG * 16 + TXBUF
        mov [es:TXQ + 8], cx
        mov bx, [tx_avail]
        mov di, bx
        and di, QSIZE - 1
        shl di, 1
        mov word [es:TXQ + AVAIL + 4 + di], 0
        inc bx
        mov [tx_avail], bx
        mov [es:TXQ + AVAIL + 2], bx
        io_port VIO_NOTIFY
        mov ax, 1
        out dx, ax
        call start_timer
.wait:  cmp [es:TXQ + USED + 2], bx
        je .done
        call elapsed
        cmp eax, TX_TICKS
        jb .wait
        mark "tx-timeout"
        jmp stop
.done:  ret

; ip_checksum: ES:DI = a 20-byte IPv4 header whose checksum field is zero.
ip_checksum:
        push di
        xor edx, edx
        mov cx, 10
.sum:   movzx eax, word [es:di]
        add edx, eax
        add di, 2
        loop .sum
        mov eax, edx
        shr eax, 16
        and edx, 0xffff
        add edx, eax
        mov eax, edx
        shr eax, 16
        add dx, ax
        not dx
        pop di
        mov [es:di + 10], dx
        ret

; clear_tx: zero CX words of TXBUF; eth_header: destination at DS:SI, source = our MAC, IPv4.
clear_tx:
        mov di, TXBUF
        xor ax, ax
        rep stosw
        ret
eth_header:
        mov di, TXBUF + 10
        movsd
        movsw
        mov si, mac
        movsd
        movsw
        mov word [es:TXBUF + 22], 0x0008
        ret

; build_dhcp: a DHCP message of type [msgtype] (1 DISCOVER, 3 REQUEST) in TXBUF; CX = length.
build_dhcp:
        mov cx, DHCP_FRAME / 2
        call clear_tx
        mov si, broadcast
        call eth_header
        mov byte [es:TXBUF + 24], 0x45
        mov word [es:TXBUF + 26], SWAP16(DHCP_FRAME - 24)
        mov word [es:TXBUF + 32], 0x1140            ; ttl 64, protocol 17
        mov dword [es:TXBUF + 40], 0xffffffff       ; 0.0.0.0 -> 255.255.255.255
        mov di, TXBUF + 24
        call ip_checksum
        mov word [es:TXBUF + 44], SWAP16(68)
        mov word [es:TXBUF + 46], SWAP16(67)
        mov word [es:TXBUF + 48], SWAP16(DHCP_FRAME - 44)
        mov dword [es:TXBUF + 52], 0x00060101       ; BOOTREQUEST, Ethernet, hlen 6
        mov eax, [xid]
        mov [es:TXBUF + 56], eax
        mov word [es:TXBUF + 62], SWAP16(0x8000)    ; broadcast replies (we have no ARP)
        mov si, mac
        mov di, TXBUF + 80                          ; chaddr
        movsd
        movsw
        mov dword [es:TXBUF + 288], 0x63538263      ; magic cookie
        mov di, TXBUF + 292
        mov ax, 0x0135                              ; option 53, length 1
        stosw
        mov al, [msgtype]
        stosb
        cmp al, 3
        jne .end
        mov ax, 0x0432                              ; option 50: requested address
        stosw
        mov eax, [my_ip]
        stosd
        mov ax, 0x0436                              ; option 54: server identifier
        stosw
        mov eax, [server_ip]
        stosd
.end:   mov al, 255
        stosb
        mov cx, DHCP_FRAME
        ret

; build_udp: the round's datagram (leased address -> server, UDP_PORT) in TXBUF.
build_udp:
        mov cx, (UDP_FRAME + 1) / 2
        call clear_tx
        mov si, gw_mac
        call eth_header
        mov byte [es:TXBUF + 24], 0x45
        mov word [es:TXBUF + 26], SWAP16(28 + UDP_LEN)
        mov word [es:TXBUF + 32], 0x1140
        mov eax, [my_ip]
        mov [es:TXBUF + 36], eax
        mov eax, [server_ip]
        mov [es:TXBUF + 40], eax
        mov di, TXBUF + 24
        call ip_checksum
        mov word [es:TXBUF + 44], SWAP16(40000)
        mov word [es:TXBUF + 46], SWAP16(UDP_PORT)
        mov word [es:TXBUF + 48], SWAP16(8 + UDP_LEN)
        ret

; ---- receive -----------------------------------------------------------------------------
; rx_poll: CF=0 and SI = the next received buffer (virtio header first), or CF=1 if none.
rx_poll:
        mov ax, [rx_seen]
        cmp ax, [es:RXQ + USED + 2]
        je .none
        mov di, ax
        and di, QSIZE - 1
        shl di, 3
        mov ax, [es:RXQ + USED + 4 + di]
        mov [rx_id], ax
        inc word [rx_seen]
        mov si, ax
        shl si, 11
        add si, RXBUF
        clc
        ret
.none:  stc
        ret

; rx_recycle: give buffer [rx_id] back to the device.
rx_recycle:
        mov bx, [rx_avail]
        mov di, bx
        and di, QSIZE - 1
        shl di, 1
        mov ax, [rx_id]
        mov [es:RXQ + AVAIL + 4 + di], ax
        inc bx
        mov [rx_avail], bx
        mov [es:RXQ + AVAIL + 2], bx
        io_port VIO_NOTIFY
        xor ax, ax
        out dx, ax
        ret

rx_drain:
        call rx_poll
        jc .done
        call rx_recycle
        jmp rx_drain
.done:  ret

; wait_go: wait for a frame of EtherType 0x88b5 (bounded).
wait_go:
        call start_timer
.poll:  call rx_poll
        jc .idle
        push word [es:si + 22]
        call rx_recycle
        pop ax
        cmp ax, SWAP16(0x88b5)
        je .go
.idle:  call elapsed
        cmp eax, GO_TICKS
        jb .poll
        mark "go-timeout"
        ret
.go:    mark "go"
        ret

; wait_reply: wait for a DHCP reply of type AL (2 OFFER, 5 ACK) to our xid; CF=1 on timeout.
wait_reply:
        mov [want], al
        call start_timer
.poll:  call rx_poll
        jc .idle
        call check_dhcp
        pushf
        call rx_recycle
        popf
        jnc .done
.idle:  call elapsed
        cmp eax, REPLY_TICKS
        jb .poll
        stc
.done:  ret

; check_dhcp: SI = received buffer; CF=0 if it is the wanted reply (address, server, MAC kept).
check_dhcp:
        cmp word [es:si + 22], 0x0008               ; IPv4
        jne .no
        cmp byte [es:si + 24], 0x45
        jne .no
        cmp byte [es:si + 33], 17                   ; UDP
        jne .no
        cmp word [es:si + 46], SWAP16(68)
        jne .no
        cmp byte [es:si + 52], 2                    ; BOOTREPLY
        jne .no
        mov eax, [es:si + 56]
        cmp eax, [xid]
        jne .no
        mov byte [got_type], 0
        lea di, [si + 292]
        lea bx, [si + BUFSZ - 6]
.opt:   cmp di, bx
        jae .end
        mov al, [es:di]
        cmp al, 255
        je .end
        test al, al
        jnz .option
        inc di
        jmp .opt
.option:
        cmp al, 53
        jne .not53
        mov al, [es:di + 2]
        mov [got_type], al
.not53: cmp byte [es:di], 54
        jne .next
        mov eax, [es:di + 2]
        mov [server_ip], eax
.next:  movzx ax, byte [es:di + 1]
        add di, ax
        add di, 2
        jmp .opt
.end:   mov al, [got_type]
        cmp al, [want]
        jne .no
        mov eax, [es:si + 68]                       ; yiaddr
        mov [my_ip], eax
        mov eax, [es:si + 16]                       ; the server's MAC (frame source)
        mov [gw_mac], eax
        mov ax, [es:si + 20]
        mov [gw_mac + 4], ax
        clc
        ret
.no:    stc
        ret

; ---- time (BIOS tick count at 0:046c, 18.2 Hz, needs interrupts on) ---------------------------
start_timer:
        sti
        mov eax, [0x46c]
        mov [t0], eax
        ret
elapsed:
        mov eax, [0x46c]
        sub eax, [t0]
        ret

; ---- data ----------------------------------------------------------------------------------
iobase:    dw 0
rx_avail:  dw 0
rx_seen:   dw 0
tx_avail:  dw 0
rx_id:     dw 0
t0:        dd 0
xid:       dd 0x42564b4b
my_ip:     dd 0
server_ip: dd 0
mac:       times 6 db 0
gw_mac:    times 6 db 0
broadcast: times 6 db 0xff
msgtype:   db 0
want:      db 0
got_type:  db 0
tries:     db 0
%if ($ - stage2_load) > STAGE2_SECTORS * 512
%error "stage 2 is larger than boot.inc loads"
%endif
