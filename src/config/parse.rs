//! Parsing and validation.
use super::{Config, ConfigError};
use std::path::Path;
pub fn load(_path: &Path) -> Result<Config, ConfigError> {
    todo!()
}
pub fn parse(_path: &Path, _text: &str) -> Result<Config, ConfigError> {
    todo!()
}
pub fn effective_json(_c: &Config) -> serde_json::Value {
    todo!()
}
