//! Step queue adapters. `memory` is the in-process queue of the local runtime.

pub mod memory;

pub use memory::MemoryQueue;
