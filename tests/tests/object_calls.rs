//! The embedded XDP/TC object calls no memory builtin. bpf-linker expands
//! `memcpy` inline but leaves `memset` and `memmove` as BPF-to-BPF calls into
//! a byte-at-a-time loop: one such call zeroing half a flow key cost every
//! IPv4 packet about 30 ns (docs/BENCHMARKS.md). The program is written to
//! need none; this keeps it so.

use object::{
    Object, ObjectSection, ObjectSymbol, RelocationTarget, SectionIndex, SectionKind, SymbolKind,
};

const BUILTINS: [&str; 5] = ["memset", "memmove", "memcpy", "memcmp", "bcmp"];
/// `BPF_JMP | BPF_CALL`; with source register `BPF_PSEUDO_CALL` (1) the
/// target is BPF code, not a kernel helper.
const CALL: u8 = 0x85;
const PSEUDO_CALL: u8 = 1;

/// Every BPF-to-BPF call in the object's code that lands in a builtin,
/// whether the linker resolved it (pc-relative immediate, no relocation) or
/// left a relocation against the function or against its section.
fn builtin_calls(bytes: &[u8]) -> (Vec<String>, Vec<String>) {
    let obj = object::File::parse(bytes).expect("parsing the object");
    // (section, start, end) of each builtin's code.
    let builtins: Vec<(SectionIndex, u64, u64)> = obj
        .symbols()
        .filter(|s| BUILTINS.contains(&s.name().unwrap_or("")))
        .filter_map(|s| {
            Some((
                s.section_index()?,
                s.address(),
                s.address() + s.size().max(8),
            ))
        })
        .collect();
    let lands_in_builtin = |sec: SectionIndex, off: u64| {
        builtins
            .iter()
            .any(|&(s, start, end)| s == sec && (start..end).contains(&off))
    };
    let mut calls = Vec::new();
    let mut scanned = Vec::new();
    for section in obj.sections().filter(|s| s.kind() == SectionKind::Text) {
        let name = section.name().unwrap_or("?").to_string();
        let data = section.data().expect("section data");
        let relocs: std::collections::HashMap<u64, _> = section.relocations().collect();
        for (i, insn) in data.chunks_exact(8).enumerate() {
            let off = (i * 8) as u64;
            if insn[0] != CALL || insn[1] >> 4 != PSEUDO_CALL {
                continue;
            }
            let imm = i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]) as i64;
            let target = match relocs.get(&off).map(|r| r.target()) {
                Some(RelocationTarget::Symbol(index)) => {
                    let sym = obj.symbol_by_index(index).expect("relocation symbol");
                    if BUILTINS.contains(&sym.name().unwrap_or("")) {
                        calls.push(format!(
                            "{name}+{off:#x} calls {}",
                            sym.name().unwrap_or("")
                        ));
                        continue;
                    }
                    match (sym.kind(), sym.section_index()) {
                        // Against a section: the immediate locates the callee in it.
                        (SymbolKind::Section, Some(sec)) => Some((sec, ((imm + 1) * 8) as u64)),
                        (_, Some(sec)) => Some((sec, sym.address())),
                        _ => None,
                    }
                }
                Some(_) => None,
                // Resolved by the linker: relative to the next instruction.
                None => Some((section.index(), (off as i64 + 8 + imm * 8) as u64)),
            };
            if let Some((sec, at)) = target {
                if lands_in_builtin(sec, at) {
                    calls.push(format!("{name}+{off:#x} calls a builtin at {at:#x}"));
                }
            }
        }
        scanned.push(name);
    }
    (calls, scanned)
}

#[test]
fn programs_call_no_memory_builtins() {
    let (calls, scanned) = builtin_calls(headroom::loader::OBJECT);
    // The XDP and TC programs' own sections: a parse that missed them would
    // pass vacuously.
    for section in ["xdp", "classifier"] {
        assert!(
            scanned.iter().any(|s| s == section),
            "section {section} not scanned (scanned: {scanned:?})"
        );
    }
    assert!(
        calls.is_empty(),
        "the programs call memory builtins (byte loops under bpf-linker); \
         write the copy or zeroing word by word instead:\n{}",
        calls.join("\n")
    );
}
