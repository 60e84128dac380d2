/*
 * livemig test guest: a bare-metal multiboot kernel for `qemu -kernel`.
 *
 * It sweeps a working set of pages, writing a stamp into each page once per
 * pass, and before overwriting a page it checks that the page still holds the
 * stamp it wrote on the previous pass. A separate "hot" page is rewritten on
 * every iteration and checked against a counter kept in a register, because
 * pages that stay resident in QEMU's TCG TLB are the ones a broken dirty
 * bitmap loses. CPU registers always survive a migration intact, so any
 * disagreement between memory and a register means memory was lost.
 *
 * Command line (multiboot cmdline, i.e. QEMU's -append), all optional:
 *   wss=MIB      working set in MiB (default 16; 0 = idle, only the hot page)
 *   spin=N       busy-loop iterations after each page write (default 0);
 *                this is what sets the dirty rate
 *   report=MS    progress line interval in milliseconds (default 1000)
 *   timer=0      no timer interrupts while sweeping (default 1; an idle
 *                guest always takes them, to wake from `hlt`): the nested
 *                KVM of our test machines cannot return from one (`iret`
 *                is an emulation failure there)
 *
 * Serial output (COM1), one line each:
 *   livemig-guest: start wss_mib=W pages=P spin=S tsc_khz=K
 *   livemig-guest: progress t_ms=T pass=N writes=W errors=E
 *   livemig-guest: CORRUPT page=0xADDR word=0 expected=0xX found=0xY
 *   livemig-guest: CORRUPT hot expected=0xX found=0xY
 *   livemig-guest: error MESSAGE
 *
 * `writes` counts loop iterations (one page write each when wss > 0): it is
 * the guest's unit of work and grows only while the vCPU runs.
 */

        .intel_syntax noprefix
        .code32

        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000003
        .set COM1, 0x3F8
        .set WS_BASE, 0x00400000
        .set STAMP_MAGIC, 0x5A17C0DE
        .set PIT_HZ, 1193182

        .section .multiboot, "a"
        .align 4
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

        .section .data
        .align 8
gdt:
        .quad 0
        .quad 0x00CF9A000000FFFF        /* 0x08: flat 32-bit code */
        .quad 0x00CF92000000FFFF        /* 0x10: flat 32-bit data */
gdt_end:
gdt_ptr:
        .word gdt_end - gdt - 1
        .long gdt
idt_ptr:
        .word 48 * 8 - 1
        .long idt

wss_mib:        .long 16
spin_count:     .long 0
report_ms:      .long 1000
timer_on:       .long 1
ws_start:       .long WS_BASE
ws_end:         .long WS_BASE
tsc_per_ms:     .long 1
tsc0_lo:        .long 0
tsc0_hi:        .long 0
next_lo:        .long 0
next_hi:        .long 0
report_tsc:     .long 0

str_start:      .asciz "livemig-guest: start wss_mib="
str_pages:      .asciz " pages="
str_spin:       .asciz " spin="
str_khz:        .asciz " tsc_khz="
str_progress:   .asciz "livemig-guest: progress t_ms="
str_pass:       .asciz " pass="
str_writes:     .asciz " writes="
str_errors:     .asciz " errors="
str_corrupt:    .asciz "livemig-guest: CORRUPT page=0x"
str_word:       .asciz " word="
str_expected:   .asciz " expected=0x"
str_found:      .asciz " found=0x"
str_hot:        .asciz "livemig-guest: CORRUPT hot expected=0x"
str_nomem:      .asciz "livemig-guest: error working set does not fit in RAM\n"
str_nomb:       .asciz "livemig-guest: error not started by a multiboot loader\n"
key_wss:        .asciz "wss="
key_spin:       .asciz "spin="
key_report:     .asciz "report="
key_timer:      .asciz "timer="

        .section .bss
        .align 4096
/* hot[0] = iteration counter (low), hot[4] = high, hot[8] = errors */
hot_page:       .skip 4096
idt:            .skip 48 * 8
        .align 16
stack_bottom:   .skip 16384
stack_top:

        .section .text
        .global _start
_start:
        cli
        mov esp, offset stack_top
        lgdt [gdt_ptr]
        mov cx, 0x10                    /* eax and ebx carry the multiboot handoff */
        mov ds, cx
        mov es, cx
        mov ss, cx
        mov fs, cx
        mov gs, cx
        ljmp 0x08, offset 1f
1:
        push eax
        push ebx
        call serial_init
        pop ebx
        pop eax
        cmp eax, 0x2BADB002
        je 2f
        mov esi, offset str_nomb
        call puts
        jmp halt_forever
2:
        /* flags bit 2: cmdline present */
        test dword ptr [ebx], 4
        jz 3f
        mov esi, [ebx + 16]
        call parse_cmdline
3:
        /* working set must end below the top of RAM (mem_upper is KiB above 1 MiB) */
        mov eax, [wss_mib]
        shl eax, 20
        add eax, WS_BASE
        mov [ws_end], eax
        test dword ptr [ebx], 1
        jz 4f
        mov ecx, [ebx + 8]
        shl ecx, 10
        add ecx, 0x100000
        cmp eax, ecx
        jbe 4f
        mov esi, offset str_nomem
        call puts
        jmp halt_forever
4:
        call calibrate_tsc
        call setup_interrupts

        mov esi, offset str_start
        call puts
        mov eax, [wss_mib]
        call put_dec32
        mov esi, offset str_pages
        call puts
        mov eax, [wss_mib]
        shl eax, 8
        call put_dec32
        mov esi, offset str_spin
        call puts
        mov eax, [spin_count]
        call put_dec32
        mov esi, offset str_khz
        call puts
        mov eax, [tsc_per_ms]
        call put_dec32
        mov al, '\n'
        call putc

        /* first report one interval from now */
        rdtsc
        mov [tsc0_lo], eax
        mov [tsc0_hi], edx
        call schedule_report

        mov esi, [ws_start]
        mov edi, 1                      /* pass number */
        xor ebp, ebp                    /* expected hot[0] */
        cmp dword ptr [timer_on], 0
        jne 7f
        mov eax, [ws_end]
        cmp eax, [ws_start]
        jne 8f
7:
        sti
8:

main_loop:
        /* hot page: must hold what the previous iteration wrote */
        mov eax, [hot_page]
        cmp eax, ebp
        jne hot_corrupt
hot_ok:
        add ebp, 1
        mov [hot_page], ebp
        jnc 1f
        add dword ptr [hot_page + 4], 1
1:
        mov eax, [ws_end]
        cmp eax, [ws_start]
        je idle_wait

        /* working-set page: check the previous pass's stamp, then restamp */
        cmp edi, 1
        je page_write
        lea eax, [edi - 1]
        cmp [esi], eax
        jne page_corrupt0
        cmp [esi + 4], esi
        jne page_corrupt1
        xor eax, esi
        xor eax, STAMP_MAGIC
        cmp [esi + 4092], eax
        jne page_corrupt2
page_write:
        mov [esi], edi
        mov [esi + 4], esi
        mov eax, edi
        xor eax, esi
        xor eax, STAMP_MAGIC
        mov [esi + 4092], eax
        add esi, 4096
        cmp esi, [ws_end]
        jb 2f
        mov esi, [ws_start]
        inc edi
2:
        mov ecx, [spin_count]
        test ecx, ecx
        jz 3f
4:
        dec ecx
        jnz 4b
3:
        test ebp, 63
        jnz main_loop
        call maybe_report
        jmp main_loop

idle_wait:
        mov ecx, [spin_count]
        test ecx, ecx
        jz 5f
6:
        dec ecx
        jnz 6b
5:
        hlt
        call maybe_report
        jmp main_loop

hot_corrupt:
        push esi
        push eax
        mov esi, offset str_hot
        call puts
        mov eax, ebp
        call put_hex32
        mov esi, offset str_found
        call puts
        mov eax, [esp]
        call put_hex32
        mov al, '\n'
        call putc
        pop ebp                         /* resynchronise so one loss is reported once */
        pop esi
        add dword ptr [hot_page + 8], 1
        jmp hot_ok

/* Page corruption: report the first bad word, then carry on restamping. */
page_corrupt0:
        xor ecx, ecx
        lea edx, [edi - 1]
        mov eax, [esi]
        jmp page_corrupt
page_corrupt1:
        mov ecx, 1
        mov edx, esi
        mov eax, [esi + 4]
        jmp page_corrupt
page_corrupt2:
        mov ecx, 1023
        lea edx, [edi - 1]
        xor edx, esi
        xor edx, STAMP_MAGIC
        mov eax, [esi + 4092]
page_corrupt:
        push eax
        push edx
        push ecx
        push esi
        mov esi, offset str_corrupt
        call puts
        mov eax, [esp]
        call put_hex32
        mov esi, offset str_word
        call puts
        mov eax, [esp + 4]
        call put_dec32
        mov esi, offset str_expected
        call puts
        mov eax, [esp + 8]
        call put_hex32
        mov esi, offset str_found
        call puts
        mov eax, [esp + 12]
        call put_hex32
        mov al, '\n'
        call putc
        pop esi
        add esp, 12
        add dword ptr [hot_page + 8], 1
        jmp page_write

halt_forever:
        cli
        hlt
        jmp halt_forever

/* ---- progress reporting ------------------------------------------------- */

/* next report time = now + report_ms * tsc_per_ms */
schedule_report:
        push eax
        push ecx
        push edx
        mov eax, [report_ms]
        mul dword ptr [tsc_per_ms]
        mov ecx, eax
        push edx
        rdtsc
        add eax, ecx
        pop ecx
        adc edx, ecx
        mov [next_lo], eax
        mov [next_hi], edx
        pop edx
        pop ecx
        pop eax
        ret

maybe_report:
        push eax
        push edx
        rdtsc
        cmp edx, [next_hi]
        ja 1f
        jb 2f
        cmp eax, [next_lo]
        jb 2f
1:
        call report
        call schedule_report
2:
        pop edx
        pop eax
        ret

report:
        push esi
        push eax
        push ecx
        push edx
        mov esi, offset str_progress
        call puts
        rdtsc
        sub eax, [tsc0_lo]
        sbb edx, [tsc0_hi]
        div dword ptr [tsc_per_ms]
        call put_dec32
        mov esi, offset str_pass
        call puts
        mov eax, edi
        call put_dec32
        mov esi, offset str_writes
        call puts
        mov edx, [hot_page + 4]
        mov eax, ebp
        call put_dec64
        mov esi, offset str_errors
        call puts
        mov eax, [hot_page + 8]
        call put_dec32
        mov al, '\n'
        call putc
        pop edx
        pop ecx
        pop eax
        pop esi
        ret

/* ---- TSC calibration against PIT channel 2 (50 ms one-shot) ------------- */

calibrate_tsc:
        in al, 0x61
        and al, 0xFC                    /* speaker off, gate low */
        out 0x61, al
        mov al, 0xB0                    /* channel 2, lo/hi, mode 0 */
        out 0x43, al
        mov eax, PIT_HZ / 20
        out 0x42, al
        mov al, ah
        out 0x42, al
        in al, 0x61
        or al, 1                        /* gate high: start counting */
        out 0x61, al
        rdtsc
        mov ebx, eax
        mov ecx, edx
1:
        in al, 0x61
        test al, 0x20
        jz 1b
        rdtsc
        sub eax, ebx
        sbb edx, ecx
        mov ecx, 50
        div ecx
        test eax, eax
        jnz 2f
        inc eax
2:
        mov [tsc_per_ms], eax
        ret

/* ---- interrupts: flat IDT, PIC remapped to 0x20, PIT channel 0 at 100 Hz */

setup_interrupts:
        mov edi, offset idt
        mov ecx, 48
1:
        mov edx, offset isr_ignore
        cmp ecx, 48 - 0x20
        jne 2f
        mov edx, offset isr_timer
2:
        mov word ptr [edi], dx
        mov word ptr [edi + 2], 0x08
        mov word ptr [edi + 4], 0x8E00
        shr edx, 16
        mov word ptr [edi + 6], dx
        add edi, 8
        dec ecx
        jnz 1b
        lidt [idt_ptr]

        mov al, 0x11
        out 0x20, al
        out 0xA0, al
        mov al, 0x20
        out 0x21, al
        mov al, 0x28
        out 0xA1, al
        mov al, 4
        out 0x21, al
        mov al, 2
        out 0xA1, al
        mov al, 1
        out 0x21, al
        out 0xA1, al
        mov al, 0xFE                    /* only IRQ0 */
        out 0x21, al
        mov al, 0xFF
        out 0xA1, al

        mov al, 0x36                    /* channel 0, lo/hi, mode 3 */
        out 0x43, al
        mov eax, PIT_HZ / 100
        out 0x40, al
        mov al, ah
        out 0x40, al
        ret

isr_timer:
        push eax
        mov al, 0x20
        out 0x20, al
        pop eax
        iret

isr_ignore:
        iret

/* ---- command line ------------------------------------------------------- */

/* esi = NUL-terminated command line; sets the variables for known keys */
parse_cmdline:
        push ebx
1:
        mov al, [esi]
        test al, al
        jz 9f
        cmp al, ' '
        jne 2f
        inc esi
        jmp 1b
2:
        mov edi, offset key_wss
        mov ebx, offset wss_mib
        call match_key
        jz 8f
        mov edi, offset key_spin
        mov ebx, offset spin_count
        call match_key
        jz 8f
        mov edi, offset key_report
        mov ebx, offset report_ms
        call match_key
        jz 8f
        mov edi, offset key_timer
        mov ebx, offset timer_on
        call match_key
        jz 8f
        /* unknown token: skip it */
3:
        mov al, [esi]
        test al, al
        jz 9f
        cmp al, ' '
        je 1b
        inc esi
        jmp 3b
8:
        call parse_dec
        mov [ebx], eax
        jmp 1b
9:
        pop ebx
        ret

/* esi = token, edi = key; ZF set and esi past the key on a match */
match_key:
        push esi
1:
        mov al, [edi]
        test al, al
        jz 2f
        cmp al, [esi]
        jne 3f
        inc esi
        inc edi
        jmp 1b
2:
        add esp, 4                      /* matched: keep the advanced esi */
        xor eax, eax
        ret
3:
        pop esi
        or eax, 1                       /* ZF clear */
        ret

/* esi = digits; eax = value, esi past the digits */
parse_dec:
        push ecx
        push edx
        xor eax, eax
1:
        movzx ecx, byte ptr [esi]
        sub ecx, '0'
        cmp ecx, 9
        ja 2f
        mov edx, 10
        mul edx
        add eax, ecx
        inc esi
        jmp 1b
2:
        pop edx
        pop ecx
        ret

/* ---- serial output ------------------------------------------------------ */

serial_init:
        mov dx, COM1 + 1
        xor al, al
        out dx, al                      /* no interrupts */
        mov dx, COM1 + 3
        mov al, 0x80
        out dx, al                      /* DLAB */
        mov dx, COM1
        mov al, 1
        out dx, al                      /* 115200 baud */
        mov dx, COM1 + 1
        xor al, al
        out dx, al
        mov dx, COM1 + 3
        mov al, 0x03
        out dx, al                      /* 8N1 */
        ret

/* al = byte */
putc:
        push edx
        push eax
        mov dx, COM1 + 5
1:
        in al, dx
        test al, 0x20
        jz 1b
        pop eax
        mov dx, COM1
        out dx, al
        pop edx
        ret

/* esi = NUL-terminated string */
puts:
        push eax
        push esi
1:
        mov al, [esi]
        test al, al
        jz 2f
        call putc
        inc esi
        jmp 1b
2:
        pop esi
        pop eax
        ret

/* eax = value */
put_hex32:
        push ecx
        push eax
        mov ecx, 8
1:
        rol eax, 4
        push eax
        and al, 0x0F
        add al, '0'
        cmp al, '9'
        jbe 2f
        add al, 'a' - '9' - 1
2:
        call putc
        pop eax
        dec ecx
        jnz 1b
        pop eax
        pop ecx
        ret

/* eax = value */
put_dec32:
        push edx
        xor edx, edx
        call put_dec64
        pop edx
        ret

/* edx:eax = value, printed in decimal */
put_dec64:
        push eax
        push ebx
        push ecx
        push edx
        push esi
        mov ecx, 10
        xor esi, esi                    /* digit count */
1:
        mov ebx, eax                    /* 64-by-32 division in two steps */
        mov eax, edx
        xor edx, edx
        div ecx
        xchg eax, ebx                   /* ebx = high quotient */
        div ecx                         /* eax = low quotient, edx = digit */
        add dl, '0'
        push edx
        inc esi
        mov edx, ebx
        mov ebx, eax
        or ebx, edx
        jnz 1b
2:
        pop eax
        call putc
        dec esi
        jnz 2b
        pop esi
        pop edx
        pop ecx
        pop ebx
        pop eax
        ret
