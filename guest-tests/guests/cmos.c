/*
 * cmos: checks the CMOS memory-size bytes against mem=<MiB> and cpus=N
 * (both required), the RTC time registers (valid BCD or binary per status
 * B, status D valid-RAM bit) and that a second reading is not earlier.
 * tick=1 additionally waits (bounded by a 3 s LAPIC-timer deadline) for
 * the seconds register to advance.
 */
#include "lib/lib.h"

#define HOLE_START (3 * GiB)

static u32 cmos_read16(u8 lo)
{
	return cmos_read(lo) | ((u32)cmos_read(lo + 1) << 8);
}

struct rtc_time {
	u8 sec, min, hour, wday, mday, mon, year, century;
};

static void read_raw(struct rtc_time *t)
{
	/* Wait while an update is in progress (bounded), then read. */
	for (int i = 0; i < 100000 && (cmos_read(0x0a) & 0x80); i++)
		cpu_relax();
	t->sec = cmos_read(0x00);
	t->min = cmos_read(0x02);
	t->hour = cmos_read(0x04);
	t->wday = cmos_read(0x06);
	t->mday = cmos_read(0x07);
	t->mon = cmos_read(0x08);
	t->year = cmos_read(0x09);
	t->century = cmos_read(0x32);
}

/* Read until two consecutive readings agree (no update in between). */
static void read_time(struct rtc_time *t)
{
	struct rtc_time u;
	for (int i = 0; i < 10; i++) {
		read_raw(t);
		read_raw(&u);
		if (memcmp(t, &u, sizeof(u)) == 0)
			return;
	}
}

static bool bcd_ok(u8 v, u8 lo, u8 hi)
{
	if ((v & 0xf) > 9 || (v >> 4) > 9)
		return false;
	u8 b = (v >> 4) * 10 + (v & 0xf);
	return b >= lo && b <= hi;
}

static u8 val(u8 v, bool bcd)
{
	return bcd ? (v >> 4) * 10 + (v & 0xf) : v;
}

static bool field_ok(u8 v, u8 lo, u8 hi, bool bcd)
{
	return bcd ? bcd_ok(v, lo, hi) : (v >= lo && v <= hi);
}

/* Comparable value: years*... seconds; hour in 24h form. */
static u64 time_key(const struct rtc_time *t, bool bcd, bool h24)
{
	u8 h = t->hour & 0x7f;
	u64 hour = val(h, bcd);
	if (!h24) {
		hour %= 12;
		if (t->hour & 0x80)
			hour += 12;
	}
	u64 k = val(t->century, bcd) * 100 + val(t->year, bcd);
	k = k * 13 + val(t->mon, bcd);
	k = k * 32 + val(t->mday, bcd);
	k = k * 24 + hour;
	k = k * 60 + val(t->min, bcd);
	k = k * 60 + val(t->sec, bcd);
	return k;
}

int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	u64 m = get_arg_size("mem", MiB, 0);
	u64 cpus = get_arg_u64("cpus", 0);

	if (!m || !cpus)
		report_abort("need mem=<MiB> and cpus=N on the command line");

	u64 low = m < HOLE_START ? m : HOLE_START;
	u64 high = m > HOLE_START ? m - HOLE_START : 0;
	u32 ext = (low - MiB) / KiB > 65535 ? 65535 : (u32)((low - MiB) / KiB);
	u32 above16 = low > 16 * MiB ? ((low - 16 * MiB) / (64 * KiB) > 65535 ? 65535 : (u32)((low - 16 * MiB) / (64 * KiB))) : 0;
	u32 above4g = (u32)(high / (64 * KiB));

	u32 v = cmos_read16(0x15);
	report(v == 640, "CMOS 0x15/0x16 base memory %u KiB (expected 640)", v);
	v = cmos_read16(0x17);
	report(v == ext, "CMOS 0x17/0x18 extended memory %u KiB (expected %u)", v, ext);
	v = cmos_read16(0x30);
	report(v == ext, "CMOS 0x30/0x31 extended memory %u KiB (expected %u)", v, ext);
	v = cmos_read16(0x34);
	report(v == above16, "CMOS 0x34/0x35 memory above 16 MiB %u x 64 KiB (expected %u)", v,
	       above16);
	v = cmos_read(0x5b) | ((u32)cmos_read(0x5c) << 8) | ((u32)cmos_read(0x5d) << 16);
	report(v == above4g, "CMOS 0x5b-0x5d memory above 4 GiB %u x 64 KiB (expected %u)", v,
	       above4g);
	v = cmos_read(0x5f);
	report(v + 1 == cpus, "CMOS 0x5f cpus-1 = %u (expected %lu)", v, cpus - 1);

	u8 b = cmos_read(0x0b), d = cmos_read(0x0d);
	bool bcd = !(b & 0x04), h24 = b & 0x02;
	printf("status A 0x%02x B 0x%02x C 0x%02x D 0x%02x (%s, %s)\n", cmos_read(0x0a), b,
	       cmos_read(0x0c), d, bcd ? "BCD" : "binary", h24 ? "24h" : "12h");
	report(d & 0x80, "status D valid RAM/time bit set");

	struct rtc_time t1, t2;
	read_time(&t1);
	printf("RTC: %02x%02x-%02x-%02x %02x:%02x:%02x weekday %x (raw)\n", t1.century, t1.year,
	       t1.mon, t1.mday, t1.hour, t1.min, t1.sec, t1.wday);
	report(field_ok(t1.sec, 0, 59, bcd), "seconds 0x%02x valid", t1.sec);
	report(field_ok(t1.min, 0, 59, bcd), "minutes 0x%02x valid", t1.min);
	if (h24)
		report(field_ok(t1.hour, 0, 23, bcd), "hours 0x%02x valid (24h)", t1.hour);
	else
		report(field_ok(t1.hour & 0x7f, 1, 12, bcd), "hours 0x%02x valid (12h)", t1.hour);
	report(field_ok(t1.wday, 1, 7, bcd), "day of week 0x%02x valid", t1.wday);
	report(field_ok(t1.mday, 1, 31, bcd), "day of month 0x%02x valid", t1.mday);
	report(field_ok(t1.mon, 1, 12, bcd), "month 0x%02x valid", t1.mon);
	report(field_ok(t1.year, 0, 99, bcd), "year 0x%02x valid", t1.year);
	report(field_ok(t1.century, 19, 21, bcd), "century 0x%02x valid", t1.century);

	read_time(&t2);
	printf("RTC again: %02x%02x-%02x-%02x %02x:%02x:%02x\n", t2.century, t2.year, t2.mon, t2.mday,
	       t2.hour, t2.min, t2.sec);
	report(time_key(&t2, bcd, h24) >= time_key(&t1, bcd, h24), "second reading is not earlier");

	if (get_arg("tick")) {
		u64 k1 = time_key(&t2, bcd, h24);
		deadline_start(3000);
		do {
			read_time(&t2);
		} while (time_key(&t2, bcd, h24) == k1 && !deadline_passed());
		u64 k2 = time_key(&t2, bcd, h24);
		report(k2 > k1 && k2 - k1 <= 2, "RTC advanced by %lu s within 3 s", k2 - k1);
	}
	return report_summary();
}
