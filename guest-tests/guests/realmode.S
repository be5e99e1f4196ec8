/*
 * realmode: a 16-bit guest in the style of kvm-unit-tests' x86/realmode: a
 * Multiboot ELF32 image linked at 0x8000 (guests/lib/standalone16.ld) whose
 * 32-bit entry drops to real mode itself (16-bit protected mode, CR0.PE
 * cleared, far jump), then checks the legacy PC state a BIOS leaves behind:
 *  - a real-mode IVT whose timer entry (vector 8: PIC master base 0x08) is
 *    set, IRQ 0 unmasked in the 8259;
 *  - PIT channel 0 ticking into IRQ 0: with `sti` timer interrupts arrive
 *    (counted by a hook chained in front of the BIOS's vector 8 entry), more
 *    than one, so the BIOS handler sends EOI and returns;
 *  - `sti; hlt` wakes up, three times, each time with a new tick;
 *  - about 18.2 ticks per RTC second (15-22 accepted).
 * The BDA tick count (0x46c) is only printed: hopvm's stub does not keep it.
 * Reports PASS/FAIL, SUMMARY and EXIT over COM1 directly from real mode and
 * exits through isa-debug-exit (port 0xf4).  Command line: none.
 * Built by build.rs as a standalone image (no guests/lib runtime).
 */

#define COM1		0x3f8
#define DEBUG_EXIT	0xf4
#define CODE16		0x08
#define DATA16		0x10
#define STACK_TOP	0x7000
#define MB_MAGIC	0x1BADB002
#define MB_FLAGS	0

	.section .multiboot, "a"
	.align 4
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

/* ------------------------------------------------------------------ */
/* 32-bit entry: flat protected mode, paging off, EAX = magic. */
	.text
	.code32
	.globl _start
_start:
	cli
	cld
	movl %eax, mb_magic
	/* For the diagnostics line: the BSP's LAPIC LVT0 and SVR. */
	movl 0xfee00350, %eax
	movl %eax, lapic_lvt0
	movl 0xfee000f0, %eax
	movl %eax, lapic_svr
	lgdt gdt_desc
	ljmp $CODE16, $pm16

/* ------------------------------------------------------------------ */
	.section .text16, "ax"
	.code16
pm16:
	/* 16-bit protected mode: 64 KiB segments, then leave protected mode. */
	movw $DATA16, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	movl %cr0, %eax
	andl $~1, %eax
	movl %eax, %cr0
	ljmp $0, $real_mode

real_mode:
	xorw %ax, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw %ax, %fs
	movw %ax, %gs
	movw $STACK_TOP, %sp
	lidt ivt_desc

	movw $msg_hello, %si
	call puts

	/* Booted via multiboot. */
	movl mb_magic, %eax
	cmpl $0x2BADB002, %eax
	sete %al
	movw $msg_magic, %si
	call report

	/* Really in real mode: CR0.PE clear, CS = 0. */
	smsw %ax
	notw %ax
	andb $1, %al
	movw %cs, %bx
	testw %bx, %bx
	jz 1f
	xorb %al, %al
1:	movw $msg_real, %si
	call report

	/* Diagnostics: IVT[8], PIC masks, LAPIC LVT0/SVR, BDA ticks. */
	movw $msg_ivt, %si
	call puts
	movw 0x22, %ax
	call puthex16
	movb $':', %al
	call putc
	movw 0x20, %ax
	call puthex16
	movw $msg_imr, %si
	call puts
	inb $0x21, %al
	movb %al, pic_imr
	call puthex8
	movw $msg_imr2, %si
	call puts
	inb $0xa1, %al
	call puthex8
	movw $msg_lvt0, %si
	call puts
	movl lapic_lvt0, %eax
	call puthex32
	movw $msg_svr, %si
	call puts
	movl lapic_svr, %eax
	call puthex32
	movw $msg_bda, %si
	call puts
	movl 0x46c, %eax
	call puthex32
	movb $'\n', %al
	call putc

	/* The timer vector is set. */
	movl 0x20, %eax
	testl %eax, %eax
	setnz %al
	movw $msg_ivt_set, %si
	call report

	/* IRQ 0 unmasked in the master 8259. */
	movb pic_imr, %al
	notb %al
	andb $1, %al
	movw $msg_irq0, %si
	call report

	/* Chain our counting hook in front of the BIOS's vector 8 entry. */
	movl 0x20, %eax
	movl %eax, old_vec8
	movw $timer_hook, 0x20
	movw $0, 0x22

	/* Timer interrupts arrive with IF=1 (bounded by 4 RTC seconds). */
	call rtc_sec
	movb %al, last_sec
	movw $0, sec_changes
	sti
2:	cmpw $3, ticks
	jae 3f
	call rtc_sec
	cmpb last_sec, %al
	je 2b
	movb %al, last_sec
	incw sec_changes
	cmpw $4, sec_changes
	jb 2b
3:	cli
	movw ticks, %dx
	cmpw $3, %dx
	setae %al
	movw $msg_ticks, %si
	call report_val
	cmpw $3, ticks
	jb no_ticks

	/* More than one tick: the BIOS handler EOIs and returns. */
	movb $1, %al
	movw $msg_eoi, %si
	call report

	/* sti; hlt wakes up, three times, each with a new tick. */
	movw $0, wakeups
	movw $3, %cx
4:	movw ticks, %bx
	sti
	hlt
	cli
	cmpw ticks, %bx
	je 5f
	incw wakeups
5:	loop 4b
	movw wakeups, %dx
	cmpw $3, %dx
	sete %al
	movw $msg_hlt, %si
	call report_val

	/* Rate: ticks between two RTC second edges. */
	call wait_sec_edge
	jc rate_fail
	movw ticks, %ax
	movw %ax, tick0
	call wait_sec_edge
	jc rate_fail
	movw ticks, %dx
	subw tick0, %dx
	cmpw $15, %dx
	setae %al
	cmpw $22, %dx
	setbe %ah
	andb %ah, %al
	movw $msg_rate, %si
	call report_val
	jmp done

rate_fail:
	xorb %al, %al
	movw ticks, %dx
	movw $msg_rate_to, %si
	call report_val
	jmp done

no_ticks:
	xorb %al, %al
	movw $msg_skip_hlt, %si
	call report

done:
	/* Restore the BIOS vector. */
	movl old_vec8, %eax
	movl %eax, 0x20
	movw $msg_summary, %si
	call puts
	movw tests, %ax
	call putdec16
	movw $msg_tests, %si
	call puts
	movw failures, %ax
	call putdec16
	movw $msg_failures, %si
	call puts
	xorl %eax, %eax
	cmpw $0, failures
	je 6f
	movl $1, %eax
6:	movl %eax, exit_code
	movw $msg_exit, %si
	call puts
	movl exit_code, %eax
	call putdec16
	movb $'\n', %al
	call putc
	movl exit_code, %eax
	movw $DEBUG_EXIT, %dx
	outl %eax, %dx
7:	cli
	hlt
	jmp 7b

/* IRQ 0 hook: count, then continue in the BIOS's handler (EOI, iret). */
timer_hook:
	incw %cs:ticks
	ljmp *%cs:old_vec8

/* AL = RTC seconds register. */
rtc_sec:
	movb $0x00, %al
	outb %al, $0x70
	inb $0x71, %al
	ret

/*
 * Waits (IF=1) until the RTC seconds register changes; CF set if 60 timer
 * ticks (3.3 s) pass first.
 */
wait_sec_edge:
	call rtc_sec
	movb %al, last_sec
	movw ticks, %bx
	sti
1:	call rtc_sec
	cmpb last_sec, %al
	jne 2f
	movw ticks, %ax
	subw %bx, %ax
	cmpw $60, %ax
	jb 1b
	cli
	stc
	ret
2:	cli
	clc
	ret

/* ---- console ---- */
/* putc: AL. */
putc:
	pushw %dx
	pushw %ax
	cmpb $'\n', %al
	jne 1f
	movb $'\r', %al
	call putc_raw
1:	popw %ax
	call putc_raw
	popw %dx
	ret

putc_raw:
	pushw %cx
	pushw %ax
	movw $COM1 + 5, %dx
	movw $0xffff, %cx
1:	inb %dx, %al
	testb $0x20, %al
	jnz 2f
	loop 1b
2:	popw %ax
	movw $COM1, %dx
	outb %al, %dx
	popw %cx
	ret

/* puts: SI = NUL-terminated string. */
puts:
	pushw %ax
	pushw %si
1:	lodsb
	testb %al, %al
	jz 2f
	call putc
	jmp 1b
2:	popw %si
	popw %ax
	ret

/* puthex4/8/16/32: AL / AL / AX / EAX, with a "0x" prefix for 16 and 32. */
puthex4:
	pushw %ax
	andb $0xf, %al
	addb $'0', %al
	cmpb $'9', %al
	jbe 1f
	addb $'a' - '0' - 10, %al
1:	call putc
	popw %ax
	ret

puthex8:
	pushw %ax
	pushw %ax
	shrb $4, %al
	call puthex4
	popw %ax
	call puthex4
	popw %ax
	ret

puthex16:
	pushw %ax
	xchgb %al, %ah
	call puthex8
	xchgb %al, %ah
	call puthex8
	popw %ax
	ret

puthex32:
	pushl %eax
	rorl $16, %eax
	call puthex16
	rorl $16, %eax
	call puthex16
	popl %eax
	ret

/* putdec16: AX, unsigned. */
putdec16:
	pushw %ax
	pushw %bx
	pushw %cx
	pushw %dx
	movw $10, %bx
	xorw %cx, %cx
1:	xorw %dx, %dx
	divw %bx
	pushw %dx
	incw %cx
	testw %ax, %ax
	jnz 1b
2:	popw %ax
	addb $'0', %al
	call putc
	loop 2b
	popw %dx
	popw %cx
	popw %bx
	popw %ax
	ret

/* report_head: AL = pass (1) or fail (0), SI = message.  Counts the test and
   prints "PASS: msg" (or "FAIL: msg") without the newline. */
report_head:
	pushw %si
	incw tests
	movw $str_pass, %si
	testb %al, %al
	jnz 1f
	incw failures
	movw $str_fail, %si
1:	call puts
	popw %si
	call puts
	ret

/* report: as report_head, then the newline. */
report:
	call report_head
	pushw %ax
	movb $'\n', %al
	call putc
	popw %ax
	ret

/* report_val: as report, then " (DX)" before the newline. */
report_val:
	call report_head
	movw $str_open, %si
	call puts
	movw %dx, %ax
	call putdec16
	movb $')', %al
	call putc
	movb $'\n', %al
	call putc
	ret

/* ------------------------------------------------------------------ */
	.data
	.align 8
gdt:
	.quad 0
	.quad 0x00009a000000ffff	/* 0x08: 16-bit code, base 0, limit 64 KiB */
	.quad 0x000092000000ffff	/* 0x10: 16-bit data, base 0, limit 64 KiB */
gdt_end:
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt
ivt_desc:
	.word 0x3ff
	.long 0

	.align 4
mb_magic:	.long 0
lapic_lvt0:	.long 0
lapic_svr:	.long 0
old_vec8:	.long 0
exit_code:	.long 0
ticks:		.word 0
tick0:		.word 0
wakeups:	.word 0
sec_changes:	.word 0
tests:		.word 0
failures:	.word 0
last_sec:	.byte 0
pic_imr:	.byte 0

str_pass:	.asciz "PASS: "
str_fail:	.asciz "FAIL: "
str_open:	.asciz " ("
msg_hello:	.asciz "realmode: 16-bit guest at 0x8000, now in real mode\n"
msg_magic:	.asciz "booted by a multiboot loader (EAX = 0x2badb002)"
msg_real:	.asciz "running in real mode (CR0.PE clear, CS = 0)"
msg_ivt:	.asciz "INFO: IVT[8] = "
msg_imr:	.asciz ", 8259 IMR master 0x"
msg_imr2:	.asciz " slave 0x"
msg_lvt0:	.asciz ", LAPIC LVT0 0x"
msg_svr:	.asciz " SVR 0x"
msg_bda:	.asciz ", BDA ticks 0x"
msg_ivt_set:	.asciz "real-mode IVT timer entry (vector 8) is set"
msg_irq0:	.asciz "IRQ 0 is unmasked in the master 8259"
msg_ticks:	.asciz "timer interrupts arrive through vector 8 in real mode, ticks"
msg_eoi:	.asciz "the BIOS timer handler sends EOI and returns (more than one tick)"
msg_hlt:	.asciz "sti; hlt wakes up on a timer tick, 3 times, wakeups"
msg_rate:	.asciz "PIT channel 0 ticks at about 18.2 Hz, ticks per RTC second"
msg_rate_to:	.asciz "RTC seconds advance while the timer ticks, ticks"
msg_skip_hlt:	.asciz "sti; hlt not tried: no timer interrupts"
msg_summary:	.asciz "SUMMARY: "
msg_tests:	.asciz " tests, "
msg_failures:	.asciz " failures\n"
msg_exit:	.asciz "EXIT: code="

	.section .note.GNU-stack, "", @progbits
