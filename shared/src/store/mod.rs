//! Run store adapters. `sqlite` is the embedded durable store of the local runtime.

pub mod sqlite;

pub use sqlite::SqliteStore;
