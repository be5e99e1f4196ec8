/*
 * Entry code for hopvm test guests.
 *
 * Booted per Multiboot v1: flat 32-bit protected mode, paging off,
 * EAX = 0x2BADB002, EBX = multiboot info.  We load our own GDT, build an
 * identity map of the first 4 GiB with 2 MiB pages (the [3 GiB, 4 GiB) hole
 * uncached), enter long mode and call lib_start() in C.
 *
 * Also holds the 256 interrupt entry stubs and the AP start-up trampoline.
 */

#define MB_MAGIC	0x1BADB002
#define MB_FLAGS	0x00000002	/* bit 1: memory information wanted */

#define STACK_SIZE	0x4000
#define AP_STACK_SIZE	0x1000
#define MAX_CPUS	32
#define AP_TRAMPOLINE	0x8000

#define CODE64	0x08
#define DATA	0x10
#define CODE32	0x18

#define MSR_EFER	0xC0000080

/* ------------------------------------------------------------------ */
	.section .multiboot, "a"
	.align 4
mb_header:
	.long MB_MAGIC
	.long MB_FLAGS
	.long -(MB_MAGIC + MB_FLAGS)

/* ------------------------------------------------------------------ */
	.section .bss
	.align 4096
	.globl pml4, pdpt, pd_low, pd_pool
pml4:	.skip 4096
pdpt:	.skip 4096
pd_low:	.skip 4096 * 4
	.align 16
	.skip STACK_SIZE
	.globl stack_top
stack_top:

/* Not zeroed at start-up (saves instructions): AP stacks. */
	.section .noinit, "aw", @nobits
	.align 4096
	.globl ap_stacks
ap_stacks:
	.skip AP_STACK_SIZE * MAX_CPUS

/* ------------------------------------------------------------------ */
	.section .data
	.align 8
	.globl mb_magic, mb_info_ptr, ap_next_index
mb_magic:	.long 0
mb_info_ptr:	.long 0
ap_next_index:	.long 0

	.align 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00af9b000000ffff	/* 0x08: 64-bit code */
	.quad 0x00cf93000000ffff	/* 0x10: flat data */
	.quad 0x00cf9b000000ffff	/* 0x18: flat 32-bit code */
gdt_end:
	.align 8
	.word 0, 0, 0
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt

/* ------------------------------------------------------------------ */
	.section .text.entry, "ax"
	.code32
	.globl _start
_start:
	cli
	cld
	movl %eax, mb_magic
	movl %ebx, mb_info_ptr
	lgdtl gdt_desc
	ljmpl $CODE32, $1f
1:	movl $DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs

	/* Zero .bss (page tables, stacks, C globals). */
	movl $__bss_start, %edi
	movl $__bss_end, %ecx
	subl %edi, %ecx
	shrl $2, %ecx
	xorl %eax, %eax
	rep stosl
	movl $stack_top, %esp

	/* PML4[0] -> PDPT; PDPT[0..3] -> pd_low */
	movl $pdpt + 3, pml4
	movl $pd_low + 3, %eax
	movl $pdpt, %edi
	movl $4, %ecx
2:	movl %eax, (%edi)
	addl $4096, %eax
	addl $8, %edi
	decl %ecx
	jnz 2b

	/* pd_low: 2048 x 2 MiB, present + writable + large */
	movl $pd_low, %edi
	movl $0x83, %eax
	xorl %ecx, %ecx
3:	movl %eax, (%edi,%ecx,8)
	addl $0x200000, %eax
	incl %ecx
	cmpl $2048, %ecx
	jne 3b
	/* [3 GiB, 4 GiB): MMIO hole, cache disabled (PCD | PWT) */
	movl $1536, %ecx
4:	orl $0x18, (%edi,%ecx,8)
	incl %ecx
	cmpl $2048, %ecx
	jne 4b

	call enter_long_mode32
	ljmpl $CODE64, $start64

/* Shared by the BSP and the AP trampoline: CR3, PAE, EFER.LME, paging. */
enter_long_mode32:
	movl $pml4, %eax
	movl %eax, %cr3
	movl %cr4, %eax
	orl $0x20, %eax			/* PAE */
	movl %eax, %cr4
	movl $MSR_EFER, %ecx
	rdmsr
	orl $0x100, %eax		/* LME */
	wrmsr
	movl %cr0, %eax
	andl $~0x60000000, %eax		/* clear CD | NW (set after INIT) */
	orl $0x80010001, %eax		/* PG | WP | PE */
	movl %eax, %cr0
	ret

	.code64
start64:
	movl $DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movq $stack_top, %rsp
	lgdt gdt_desc
	xorl %ebp, %ebp
	call lib_start
5:	cli
	hlt
	jmp 5b

/* AP arrives here in long mode from the trampoline. */
	.globl ap_start64
ap_start64:
	movl $DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	lgdt gdt_desc
	movl $1, %eax
	lock xaddl %eax, ap_next_index
	cmpl $MAX_CPUS - 1, %eax
	jae 6f
	movl %eax, %edi
	incl %eax
	shll $12, %eax			/* AP_STACK_SIZE */
	addq $ap_stacks, %rax
	movq %rax, %rsp
	xorl %ebp, %ebp
	call ap_entry
6:	cli
	hlt
	jmp 6b

/* ------------------------------------------------------------------ */
/*
 * AP trampoline: copied to AP_TRAMPOLINE (SIPI vector 0x08) by smp.c.
 * Real mode -> 32-bit protected mode -> long mode -> ap_start64.
 */
	.text
	.globl ap_tramp_start, ap_tramp_end
	.code16
ap_tramp_start:
	cli
	cld
	movw %cs, %ax
	movw %ax, %ds
	lgdtl tramp_gdt_desc - ap_tramp_start
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl $CODE32, $(AP_TRAMPOLINE + tramp32 - ap_tramp_start)
	.code32
tramp32:
	movl $DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	/* Temporary stack inside the trampoline page for the call below. */
	movl $(AP_TRAMPOLINE + 0x1000), %esp
	movl $enter_long_mode32, %eax
	call *%eax
	ljmpl $CODE64, $ap_start64
	.align 8
	.word 0, 0, 0
tramp_gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt
ap_tramp_end:
	.code64

/* ------------------------------------------------------------------ */
/* Interrupt entry stubs: 16 bytes each, isr_stubs + 16 * vector. */
	.text
	.align 16
	.globl isr_stubs
isr_stubs:
	.set vec, 0
	.rept 256
	.align 16
	.if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	pushq $0
	.endif
	pushq $vec
	jmp isr_common
	.set vec, vec + 1
	.endr

isr_common:
	pushq %rax
	pushq %rcx
	pushq %rdx
	pushq %rbx
	pushq %rbp
	pushq %rsi
	pushq %rdi
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, %rdi
	cld
	call isr_dispatch
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rdi
	popq %rsi
	popq %rbp
	popq %rbx
	popq %rdx
	popq %rcx
	popq %rax
	addq $16, %rsp
	iretq

	.section .note.GNU-stack, "", @progbits
