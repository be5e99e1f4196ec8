/* COM1 console and a small printf (d i u x X p s c %, widths, '-', '0', l/ll/z). */
#include "lib.h"

#define COM1 0x3f8

static volatile u32 console_lock;

static void lock(void)
{
	while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
		cpu_relax();
}

static void unlock(void)
{
	__atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
}

void serial_init(void)
{
	outb(COM1 + 1, 0x00); /* IER: no interrupts */
	outb(COM1 + 3, 0x80); /* LCR: DLAB */
	outb(COM1 + 0, 0x01); /* 115200 baud */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03); /* 8N1 */
	outb(COM1 + 4, 0x03); /* MCR: DTR | RTS */
}

static void serial_putc(char c)
{
	/* Poll LSR.THRE; give up after a bounded number of polls. */
	for (int i = 0; i < 100000; i++)
		if (inb(COM1 + 5) & 0x20)
			break;
	outb(COM1, (u8)c);
}

static void raw_putchar(int c)
{
	if (c == '\n')
		serial_putc('\r');
	serial_putc((char)c);
}

void putchar(int c)
{
	lock();
	raw_putchar(c);
	unlock();
}

void puts(const char *s)
{
	lock();
	while (*s)
		raw_putchar(*s++);
	unlock();
}

struct out {
	char *buf;
	size_t size;
	size_t pos;
};

static void emit(struct out *o, char c)
{
	if (o->buf) {
		if (o->pos + 1 < o->size)
			o->buf[o->pos] = c;
	} else {
		raw_putchar(c);
	}
	o->pos++;
}

static void emit_num(struct out *o, u64 v, unsigned base, bool upper, bool neg, int width, bool zero,
		     bool left)
{
	char tmp[24];
	const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
	int n = 0;

	do {
		tmp[n++] = digits[v % base];
		v /= base;
	} while (v);
	int len = n + (neg ? 1 : 0);
	if (neg && zero)
		emit(o, '-');
	if (!left)
		for (; width > len; width--)
			emit(o, zero ? '0' : ' ');
	if (neg && !zero)
		emit(o, '-');
	while (n)
		emit(o, tmp[--n]);
	if (left)
		for (; width > len; width--)
			emit(o, ' ');
}

static void format(struct out *o, const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			emit(o, *fmt);
			continue;
		}
		fmt++;
		bool zero = false, left = false;
		int width = 0, lng = 0;
		for (;; fmt++) {
			if (*fmt == '0')
				zero = true;
			else if (*fmt == '-')
				left = true;
			else
				break;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l' || *fmt == 'z') {
			lng++;
			fmt++;
		}
		if (left)
			zero = false;
		switch (*fmt) {
		case 'd':
		case 'i': {
			s64 v = lng ? va_arg(ap, s64) : va_arg(ap, int);
			bool neg = v < 0;
			emit_num(o, neg ? (u64)0 - (u64)v : (u64)v, 10, false, neg, width, zero, left);
			break;
		}
		case 'u':
			emit_num(o, lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 10, false, false, width, zero,
				 left);
			break;
		case 'x':
		case 'X':
			emit_num(o, lng ? va_arg(ap, u64) : va_arg(ap, unsigned), 16, *fmt == 'X', false, width,
				 zero, left);
			break;
		case 'p':
			emit(o, '0');
			emit(o, 'x');
			emit_num(o, (u64)va_arg(ap, void *), 16, false, false, width, zero, left);
			break;
		case 'c':
			emit(o, (char)va_arg(ap, int));
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s)
				s = "(null)";
			int len = (int)strlen(s);
			if (!left)
				for (; width > len; width--)
					emit(o, ' ');
			while (*s)
				emit(o, *s++);
			if (left)
				for (; width > len; width--)
					emit(o, ' ');
			break;
		}
		case '%':
			emit(o, '%');
			break;
		case '\0':
			return;
		default:
			emit(o, '%');
			emit(o, *fmt);
			break;
		}
	}
}

int vprintf(const char *fmt, va_list ap)
{
	struct out o = { 0 };
	lock();
	format(&o, fmt, ap);
	unlock();
	return (int)o.pos;
}

int printf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vprintf(fmt, ap);
	va_end(ap);
	return n;
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct out o = { buf, size, 0 };
	format(&o, fmt, ap);
	if (size)
		buf[o.pos < size ? o.pos : size - 1] = '\0';
	return (int)o.pos;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}
