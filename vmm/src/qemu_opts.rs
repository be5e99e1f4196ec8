//! QEMU's option syntax, `key=value,flag,key2=a,,b`, as `-cpu`, `-m`, `-device`, `-chardev`,
//! `-qmp` and hopvm's own QEMU-style options are written: items separated by single commas,
//! with `,,` standing for a literal comma (QEMU's `qemu_opts_parse` rule). Every parser of
//! such options in hopvm splits them here.

/// Splits `s` at single commas; `,,` is a literal comma inside an item. An empty string is one
/// empty item, and a trailing single comma leaves an empty last item, as in QEMU.
pub fn split_options(s: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            current.push(c);
        } else if chars.peek() == Some(&',') {
            chars.next();
            current.push(',');
        } else {
            items.push(std::mem::take(&mut current));
        }
    }
    items.push(current);
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_single_commas_and_unescapes_double_ones() {
        assert_eq!(split_options(""), [""]);
        assert_eq!(split_options("qemu64"), ["qemu64"]);
        assert_eq!(split_options("a=1,b,c=x"), ["a=1", "b", "c=x"]);
        assert_eq!(
            split_options("model-id=Hop,,CPU,+x2apic"),
            ["model-id=Hop,CPU", "+x2apic"]
        );
        assert_eq!(split_options("/tmp/a,,b,server"), ["/tmp/a,b", "server"]);
        assert_eq!(split_options("a,,,b"), ["a,", "b"]);
        assert_eq!(split_options("a,,,,b"), ["a,,b"]);
        assert_eq!(split_options("a,"), ["a", ""]);
        assert_eq!(split_options(",a"), ["", "a"]);
    }
}
