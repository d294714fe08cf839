//! Config errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("todo")]
    Todo,
}
