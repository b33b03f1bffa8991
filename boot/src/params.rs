//! A function's parameters as the image's DWARF describes them (names and types), and whether its
//! 32-bit code passes arguments in registers: what `calls` needs to show a call as its source reads.
//!
//! Read with `gimli` over sections found by `object`, the crates the Rust toolchain's own backtraces use
//! (through `addr2line`). An image without debug information, or a function the DWARF does not describe,
//! simply gets no parameters: the caller then shows raw argument slots.

use gimli::{AttributeValue, EndianSlice, RunTimeEndian, UnitRef};
use object::{Object, ObjectSection};

/// One formal parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// Its name (`?` where the DWARF gives none).
    pub name: String,
    /// Its type as C spells it, roughly (`const char *`, `struct file *`, `unsigned int`); None if unknown.
    pub type_name: Option<String>,
}

/// What the DWARF says of a function.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FunctionInfo {
    /// Its parameters, in order.
    pub params: Vec<Param>,
    /// The compilation unit was built with `-mregparm=3` (as gcc records in DW_AT_producer): 32-bit code
    /// then passes the first three arguments in EAX, EDX and ECX.
    pub regparm: bool,
}

type Slice<'a> = EndianSlice<'a, RunTimeEndian>;

/// The DWARF description of the function whose code starts at `entry`, if the image has one.
pub fn function_at(image: &[u8], entry: u64) -> Option<FunctionInfo> {
    let file = object::File::parse(image).ok()?;
    let endian = if file.is_little_endian() {
        RunTimeEndian::Little
    } else {
        RunTimeEndian::Big
    };
    let dwarf = gimli::Dwarf::load(|id| -> Result<Slice<'_>, gimli::Error> {
        let data = file
            .section_by_name(id.name())
            .and_then(|s| s.data().ok())
            .unwrap_or(&[]);
        Ok(EndianSlice::new(data, endian))
    })
    .ok()?;
    let mut headers = dwarf.units();
    while let Ok(Some(header)) = headers.next() {
        let Ok(unit) = dwarf.unit(header) else {
            continue;
        };
        let unit = unit.unit_ref(&dwarf);
        if !unit_covers(unit, entry) {
            continue;
        }
        if let Some(info) = function_in_unit(unit, entry) {
            return Some(info);
        }
    }
    None
}

/// Whether the unit's code ranges include `addr`.
fn unit_covers(unit: UnitRef<'_, Slice<'_>>, addr: u64) -> bool {
    let Ok(mut ranges) = unit.unit_ranges() else {
        return false;
    };
    while let Ok(Some(r)) = ranges.next() {
        if (r.begin..r.end).contains(&addr) {
            return true;
        }
    }
    false
}

/// The subprogram of the unit whose code starts at `entry`, with its parameters.
fn function_in_unit<'a>(unit: UnitRef<'_, Slice<'a>>, entry: u64) -> Option<FunctionInfo> {
    let mut cursor = unit.entries();
    let mut regparm = false;
    while let Ok(Some(die)) = cursor.next_dfs() {
        match die.tag() {
            gimli::DW_TAG_compile_unit => {
                regparm = die
                    .attr_value(gimli::DW_AT_producer)
                    .and_then(|v| unit.attr_string(v).ok())
                    .is_some_and(|p| String::from_utf8_lossy(p.slice()).contains("-mregparm=3"));
            }
            gimli::DW_TAG_subprogram => {
                let low = die
                    .attr_value(gimli::DW_AT_low_pc)
                    .and_then(|v| unit.attr_address(v).ok().flatten());
                if low == Some(entry) {
                    let depth = die.depth();
                    return Some(FunctionInfo {
                        params: params_after(unit, &mut cursor, depth),
                        regparm,
                    });
                }
            }
            _ => {}
        }
    }
    None
}

/// The formal parameters among the children of the DIE the cursor just returned (at `depth`).
fn params_after<'a>(
    unit: UnitRef<'_, Slice<'a>>,
    cursor: &mut gimli::EntriesCursor<'_, Slice<'a>>,
    depth: isize,
) -> Vec<Param> {
    let mut params = Vec::new();
    while let Ok(Some(die)) = cursor.next_dfs() {
        if die.depth() <= depth {
            break;
        }
        if die.depth() == depth + 1 && die.tag() == gimli::DW_TAG_formal_parameter {
            // A concrete copy of an inlined or out-of-line function names its parameters through the
            // abstract one.
            let described = match die.attr_value(gimli::DW_AT_abstract_origin) {
                Some(AttributeValue::UnitRef(o)) => unit.entry(o).ok(),
                _ => None,
            };
            let source = described.as_ref().unwrap_or(die);
            params.push(Param {
                name: name_of(unit, source).unwrap_or_else(|| "?".into()),
                type_name: type_of(unit, source, 0),
            });
        }
    }
    params
}

fn name_of<'a>(
    unit: UnitRef<'_, Slice<'a>>,
    die: &gimli::DebuggingInformationEntry<Slice<'a>>,
) -> Option<String> {
    let v = die.attr_value(gimli::DW_AT_name)?;
    let s = unit.attr_string(v).ok()?;
    Some(String::from_utf8_lossy(s.slice()).into_owned())
}

/// The C spelling of a DIE's DW_AT_type, a few levels deep (`struct file *`, `const char *`).
fn type_of<'a>(
    unit: UnitRef<'_, Slice<'a>>,
    die: &gimli::DebuggingInformationEntry<Slice<'a>>,
    depth: u32,
) -> Option<String> {
    /// Deeper than this the name is left out: types are rarely nested more in a parameter.
    const MAX_DEPTH: u32 = 6;
    let Some(AttributeValue::UnitRef(o)) = die.attr_value(gimli::DW_AT_type) else {
        // No type: `void` (the end of a `void *`).
        return Some("void".into());
    };
    if depth >= MAX_DEPTH {
        return None;
    }
    let t = unit.entry(o).ok()?;
    let inner = || type_of(unit, &t, depth + 1);
    Some(match t.tag() {
        gimli::DW_TAG_pointer_type => format!("{} *", inner()?),
        gimli::DW_TAG_const_type => format!("const {}", inner()?),
        gimli::DW_TAG_volatile_type => format!("volatile {}", inner()?),
        gimli::DW_TAG_structure_type => format!("struct {}", name_of(unit, &t)?),
        gimli::DW_TAG_union_type => format!("union {}", name_of(unit, &t)?),
        gimli::DW_TAG_enumeration_type => format!("enum {}", name_of(unit, &t)?),
        // Base types and typedefs go by their own names.
        _ => name_of(unit, &t).or_else(inner)?,
    })
}
