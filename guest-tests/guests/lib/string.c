/* Minimal string and number helpers for the freestanding guests. */
#include "lib.h"

void *memset(void *s, int c, size_t n)
{
	u8 *p = s;
	while (n--)
		*p++ = (u8)c;
	return s;
}

void *memcpy(void *d, const void *s, size_t n)
{
	u8 *dp = d;
	const u8 *sp = s;
	while (n--)
		*dp++ = *sp++;
	return d;
}

void *memmove(void *d, const void *s, size_t n)
{
	u8 *dp = d;
	const u8 *sp = s;
	if (dp < sp) {
		while (n--)
			*dp++ = *sp++;
	} else {
		while (n--)
			dp[n] = sp[n];
	}
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

int strcmp(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return (u8)*a - (u8)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
	for (; n; n--, a++, b++) {
		if (*a != *b)
			return (u8)*a - (u8)*b;
		if (!*a)
			break;
	}
	return 0;
}

char *strchr(const char *s, int c)
{
	for (;; s++) {
		if (*s == (char)c)
			return (char *)s;
		if (!*s)
			return NULL;
	}
}

char *strstr(const char *haystack, const char *needle)
{
	size_t n = strlen(needle);

	for (; *haystack; haystack++)
		if (strncmp(haystack, needle, n) == 0)
			return (char *)haystack;
	return n == 0 ? (char *)haystack : NULL;
}

static bool parse_digits(const char **sp, u64 *out)
{
	const char *s = *sp;
	u64 v = 0;
	unsigned base = 10;
	bool any = false;

	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	for (;; s++) {
		unsigned d;
		if (*s >= '0' && *s <= '9')
			d = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = *s - 'a' + 10;
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = *s - 'A' + 10;
		else
			break;
		if (v > (~0ULL - d) / base)
			return false;
		v = v * base + d;
		any = true;
	}
	*sp = s;
	*out = v;
	return any;
}

bool parse_u64(const char *s, u64 *out)
{
	return parse_digits(&s, out) && *s == '\0';
}

bool parse_size(const char *s, u64 default_unit, u64 *out)
{
	u64 v, unit = default_unit;

	if (!parse_digits(&s, &v))
		return false;
	switch (*s) {
	case '\0':
		break;
	case 'b': case 'B': unit = 1; s++; break;
	case 'k': case 'K': unit = KiB; s++; break;
	case 'm': case 'M': unit = MiB; s++; break;
	case 'g': case 'G': unit = GiB; s++; break;
	case 't': case 'T': unit = 1024 * GiB; s++; break;
	default:
		return false;
	}
	if (unit != 1 && (s[0] == 'i' && s[1] == 'B'))
		s += 2;
	else if (unit != 1 && s[0] == 'B')
		s++;
	if (*s)
		return false;
	if (unit && v > ~0ULL / unit)
		return false;
	*out = v * unit;
	return true;
}
