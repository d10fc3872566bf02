//! Node's child-process IPC protocol (wip).
mod frame;
mod message;
pub use frame::*;
pub use message::*;
