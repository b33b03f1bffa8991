//! The Intel MultiProcessor Specification (1.4) tables that tell a kernel how many CPUs the machine
//! has, where its IOAPIC is, and how the ISA interrupts reach it: a floating pointer structure and a
//! configuration table, in the BIOS area at [`MP_TABLE_ADDR`], where a kernel scans for them.
//!
//! Why an MP table rather than ACPI's MADT: the tiny test kernel finds an MP table with code it
//! already has (CONFIG_X86_MPPARSE is on without ACPI), while ACPI would add the whole ACPICA
//! interpreter to a kernel whose ring-0 code this host emulates instruction by instruction. Older VMMs
//! (Firecracker, crosvm) booted Linux the same way.

use memory::{GuestMemory, MemoryError};

/// Where the tables go: the start of the BIOS area (0xF0000-0xFFFFF), which the memory map reserves
/// and a kernel's MP scan covers.
pub const MP_TABLE_ADDR: u64 = 0xF_0000;
/// The local APICs' address, as the configuration table gives it.
const LOCAL_APIC_ADDR: u32 = 0xFEE0_0000;
/// The IOAPIC's address.
const IOAPIC_ADDR: u32 = 0xFEC0_0000;
/// The local APIC version (an integrated xAPIC), as the local APIC model's version register says.
const LOCAL_APIC_VERSION: u8 = 0x14;
/// The IOAPIC version (82093AA).
const IOAPIC_VERSION: u8 = 0x11;
/// Entry types of the configuration table.
const PROCESSOR: u8 = 0;
const BUS: u8 = 1;
const IOAPIC: u8 = 2;
const IO_INTERRUPT: u8 = 3;
const LOCAL_INTERRUPT: u8 = 4;
/// Interrupt types of the interrupt entries.
const INT: u8 = 0;
const NMI: u8 = 1;
const EXTINT: u8 = 3;

/// The IOAPIC pin ISA IRQ `line` drives: IRQ 0 (the PIT) on pin 2, as on every PC chipset; the others
/// on the pin of their number.
pub fn ioapic_pin(line: u8) -> u8 {
    if line == 0 {
        2
    } else {
        line
    }
}

/// The byte that makes `bytes` sum to zero, as every MP structure's checksum must.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, &b| sum.wrapping_add(b))
        .wrapping_neg()
}

/// The configuration table's entries for `cpus` CPUs (APIC IDs 0 to cpus-1; the IOAPIC takes the next).
fn entries(cpus: u8) -> (Vec<u8>, u16) {
    let mut e = Vec::new();
    let mut count = 0u16;
    for id in 0..cpus {
        // Enabled (bit 0); the bootstrap processor (bit 1) is APIC ID 0.
        let flags = 1 | if id == 0 { 2 } else { 0 };
        e.extend([PROCESSOR, id, LOCAL_APIC_VERSION, flags]);
        // CPU signature (family 6) and feature flags (FPU, APIC), then 8 reserved bytes.
        e.extend(0x600u32.to_le_bytes());
        e.extend(0x201u32.to_le_bytes());
        e.extend([0; 8]);
        count += 1;
    }
    e.extend([BUS, 0]);
    e.extend(*b"ISA   ");
    count += 1;
    let ioapic_id = cpus;
    e.extend([IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    e.extend(IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // The ISA interrupts: edge-triggered, active high, as the bus defines them (flags 0). IRQ 2 is the
    // 8259 cascade, which reaches no pin.
    for line in (0..16u8).filter(|&l| l != 2) {
        e.extend([
            IO_INTERRUPT,
            INT,
            0,
            0,
            0,
            line,
            ioapic_id,
            ioapic_pin(line),
        ]);
        count += 1;
    }
    // The 8259 on every local APIC's LINT0 (only the bootstrap processor's passes it), NMI on LINT1.
    e.extend([LOCAL_INTERRUPT, EXTINT, 0, 0, 0, 0, 0xFF, 0]);
    e.extend([LOCAL_INTERRUPT, NMI, 0, 0, 0, 0, 0xFF, 1]);
    count += 2;
    (e, count)
}

/// Writes the MP floating pointer and configuration table for a machine with `cpus` CPUs at
/// [`MP_TABLE_ADDR`].
pub fn write(mem: &mut GuestMemory, cpus: u8) -> Result<(), MemoryError> {
    const POINTER_LEN: u64 = 16;
    const HEADER_LEN: usize = 44;
    let table_addr = MP_TABLE_ADDR + POINTER_LEN;
    let (entries, count) = entries(cpus);
    let mut table = Vec::with_capacity(HEADER_LEN + entries.len());
    table.extend(*b"PCMP");
    table.extend(((HEADER_LEN + entries.len()) as u16).to_le_bytes());
    table.extend([4, 0]); // spec revision 1.4, checksum below
    table.extend(*b"RETROVSR"); // OEM ID
    table.extend(*b"RETROVISOR  "); // product ID
    table.extend(0u32.to_le_bytes()); // no OEM table
    table.extend(0u16.to_le_bytes());
    table.extend(count.to_le_bytes());
    table.extend(LOCAL_APIC_ADDR.to_le_bytes());
    table.extend([0; 4]); // no extended table: length, checksum, reserved
    table.extend(entries);
    table[7] = checksum(&table);

    let mut pointer = Vec::with_capacity(POINTER_LEN as usize);
    pointer.extend(*b"_MP_");
    pointer.extend((table_addr as u32).to_le_bytes());
    pointer.extend([1, 4, 0]); // length in 16-byte units, spec revision 1.4, checksum below
    pointer.extend([0; 5]); // feature bytes: a configuration table is present; no IMCR
    pointer[10] = checksum(&pointer);

    mem.write(MP_TABLE_ADDR, &pointer)?;
    mem.write(table_addr, &table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_checksum_to_zero_and_list_every_cpu_the_ioapic_and_the_isa_interrupts() {
        let mut mem = GuestMemory::new(2 << 20).unwrap();
        write(&mut mem, 4).unwrap();
        let mut pointer = [0u8; 16];
        mem.read(MP_TABLE_ADDR, &mut pointer).unwrap();
        assert_eq!(&pointer[..4], b"_MP_");
        assert_eq!(pointer.iter().fold(0u8, |s, &b| s.wrapping_add(b)), 0);
        let table_addr = u64::from(u32::from_le_bytes(pointer[4..8].try_into().unwrap()));
        let mut header = [0u8; 44];
        mem.read(table_addr, &mut header).unwrap();
        assert_eq!(&header[..4], b"PCMP");
        let len = usize::from(u16::from_le_bytes([header[4], header[5]]));
        let mut table = vec![0u8; len];
        mem.read(table_addr, &mut table).unwrap();
        assert_eq!(table.iter().fold(0u8, |s, &b| s.wrapping_add(b)), 0);
        let count = u16::from_le_bytes([header[34], header[35]]);
        // 4 processors, a bus, an IOAPIC, 15 ISA interrupts, 2 local interrupts.
        assert_eq!(count, 4 + 1 + 1 + 15 + 2);
        assert_eq!(len, 44 + 4 * 20 + 8 * (1 + 1 + 15 + 2));
        // The bootstrap processor is APIC ID 0, the others enabled but not BSP.
        assert_eq!(&table[44..48], &[PROCESSOR, 0, LOCAL_APIC_VERSION, 3]);
        assert_eq!(&table[64..68], &[PROCESSOR, 1, LOCAL_APIC_VERSION, 1]);
        // The PIT's IRQ 0 arrives on pin 2.
        let irq0 = 44 + 4 * 20 + 8 + 8;
        assert_eq!(
            &table[irq0..irq0 + 8],
            &[IO_INTERRUPT, INT, 0, 0, 0, 0, 4, 2]
        );
    }
}
