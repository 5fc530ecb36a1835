//! The embedded XDP/TC object calls no memory builtin. bpf-linker expands
//! `memcpy` inline but leaves `memset` and `memmove` as BPF-to-BPF calls into
//! a byte-at-a-time loop: one such call zeroing half a flow key cost every
//! IPv4 packet about 30 ns (docs/BENCHMARKS.md). The program is written to
//! need none; this keeps it so.

use object::{Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionKind};

#[test]
fn programs_call_no_memory_builtins() {
    let obj = object::File::parse(headroom::loader::OBJECT).expect("parsing the embedded object");
    let mut calls = Vec::new();
    let mut code_sections = 0;
    for section in obj.sections().filter(|s| s.kind() == SectionKind::Text) {
        code_sections += 1;
        for (offset, rel) in section.relocations() {
            let RelocationTarget::Symbol(index) = rel.target() else {
                continue;
            };
            let name = obj
                .symbol_by_index(index)
                .and_then(|s| s.name().map(str::to_string))
                .unwrap_or_default();
            if matches!(
                name.as_str(),
                "memset" | "memmove" | "memcpy" | "memcmp" | "bcmp"
            ) {
                let section = section.name().unwrap_or("?");
                calls.push(format!("{section}+{offset:#x} calls {name}"));
            }
        }
    }
    // The balancer's XDP and TC programs at least: a parse that found no
    // code would pass vacuously.
    assert!(
        code_sections >= 2,
        "only {code_sections} code sections in the object"
    );
    assert!(
        calls.is_empty(),
        "the programs call memory builtins (byte loops under bpf-linker); \
         write the copy or zeroing word by word instead:\n{}",
        calls.join("\n")
    );
}
