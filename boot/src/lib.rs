//! Putting a guest image into RAM: [`loader`] boots a Multiboot v1 kernel or an ELF with a PVH entry
//! ([`pvh`], Linux's vmlinux), with the ELF readers they share ([`elf`]); [`symbols`] names addresses
//! from an image's symbol table. Images are untrusted: every offset is checked.

pub mod elf;
pub mod loader;
pub mod mptable;
pub mod params;
pub mod pvh;
pub mod symbols;
