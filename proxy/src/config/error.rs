//! Configuration errors: each names the field it is about.

use std::fmt;

/// One problem with a configuration, at a field path such as `static_resources.clusters[2].lb_policy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the configuration came from: a file name, `--config-yaml`, or an xDS resource.
    pub source: Option<String>,
    /// The field path, with proto field names and list indexes; empty for the whole document.
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            source: None,
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(s) = &self.source {
            write!(f, "{s}: ")?;
        }
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Every error found in one configuration, in the order found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn with_source(mut self, source: &str) -> Self {
        for e in &mut self.0 {
            e.source.get_or_insert_with(|| source.to_string());
        }
        self
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}
