//! Devices airlock emulates in its own process: edu, QEMU's reference
//! device, and the interrupt table it signals through.

pub mod edu;
pub mod irq_table;
