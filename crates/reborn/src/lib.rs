pub mod activation;
pub mod error;
pub mod listeners;
pub mod notify;
pub mod spawn;
pub mod upgrade { #[derive(Debug, thiserror::Error)] #[error("x")] pub struct UpgradeError; }
pub fn init() {}
