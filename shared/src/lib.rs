//! AI-Orchestra's library: the workflow language, static validation, the pure engine, the ports
//! with their local adapters, the step actions and the runtime that ties them together.
//!
//! Layout: [`workflow`] (language, validation) -> [`engine`] (pure state machine) -> [`runtime`]
//! (carries out the engine's actions through the [`ports`]) with adapters in [`store`], [`queue`]
//! and [`secrets`], and step actions in [`steps`]. [`Orchestra`] is the programmatic entry point.

#[cfg(feature = "local")]
pub mod api;
#[cfg(feature = "aws")]
pub mod aws;
pub mod engine;
pub mod failure;
#[cfg(feature = "http-api")]
pub mod http_api;
pub mod ports;
pub mod queue;
pub mod runtime;
pub mod schema;
pub mod secrets;
pub mod steps;
#[cfg(feature = "local")]
pub mod store;
pub mod template;
pub mod workflow;

#[cfg(feature = "local")]
pub use api::{Orchestra, RunResult};
