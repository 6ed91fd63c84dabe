//! Reading a parsed message while lowering it, so that nothing can be ignored silently.
//!
//! A [`Node`] wraps one message and its field path. Every accessor marks the field it reads as handled; when the
//! node is dropped, each field that is set but was never read is reported as `<path>.<field>: not supported`.
//! Lowering code therefore only has to read what Remora implements: a field it does not read is refused by
//! construction, and a field added to Envoy's API later is refused until someone reads it.

use super::descriptors;
use super::error::ConfigError;
use prost::Message;
use prost_reflect::{DynamicMessage, FieldDescriptor, MapKey, ReflectMessage, Value};
use std::borrow::Cow;
use std::cell::RefCell;
use std::time::Duration;

/// Collects the errors of one lowering pass.
#[derive(Default, Debug)]
pub struct Errors(RefCell<Vec<ConfigError>>);

impl Errors {
    pub fn push(&self, path: impl Into<String>, message: impl Into<String>) {
        self.0.borrow_mut().push(ConfigError::new(path, message));
    }
    pub fn is_empty(&self) -> bool {
        self.0.borrow().is_empty()
    }
    pub fn take(&self) -> Vec<ConfigError> {
        std::mem::take(&mut *self.0.borrow_mut())
    }
}

/// One message being lowered.
pub struct Node<'a> {
    msg: Cow<'a, DynamicMessage>,
    path: String,
    used: RefCell<Vec<u32>>,
    errs: &'a Errors,
}

impl std::fmt::Debug for Node<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Node({} at {:?})",
            self.msg.descriptor().full_name(),
            self.path
        )
    }
}

impl Drop for Node<'_> {
    fn drop(&mut self) {
        let used = self.used.borrow();
        for (field, _) in self.msg.fields() {
            if !used.contains(&field.number()) {
                self.errs
                    .push(self.child_path(field.name()), "not supported by Remora");
            }
        }
    }
}

impl<'a> Node<'a> {
    pub fn root(msg: &'a DynamicMessage, path: impl Into<String>, errs: &'a Errors) -> Self {
        Node {
            msg: Cow::Borrowed(msg),
            path: path.into(),
            used: RefCell::default(),
            errs,
        }
    }

    pub fn owned(msg: DynamicMessage, path: impl Into<String>, errs: &'a Errors) -> Self {
        Node {
            msg: Cow::Owned(msg),
            path: path.into(),
            used: RefCell::default(),
            errs,
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn errors(&self) -> &'a Errors {
        self.errs
    }

    /// The message's full protobuf name.
    pub fn type_name(&self) -> String {
        self.msg.descriptor().full_name().to_string()
    }

    pub fn message(&self) -> &DynamicMessage {
        &self.msg
    }

    pub fn child_path(&self, field: &str) -> String {
        if self.path.is_empty() {
            field.to_string()
        } else {
            format!("{}.{field}", self.path)
        }
    }

    fn fd(&self, name: &str) -> Option<FieldDescriptor> {
        let fd = self.msg.descriptor().get_field_by_name(name);
        if fd.is_none() {
            self.errs.push(
                self.child_path(name),
                format!("internal: {} has no such field", self.type_name()),
            );
        }
        fd
    }

    /// Report an error about field `name`.
    pub fn err(&self, name: &str, message: impl Into<String>) {
        self.errs.push(self.child_path(name), message);
    }

    /// Report an error about this message as a whole.
    pub fn err_here(&self, message: impl Into<String>) {
        self.errs.push(self.path.clone(), message);
    }

    /// Mark a field handled without reading it (a documented no-op).
    pub fn mark(&self, name: &str) {
        if let Some(fd) = self.fd(name) {
            self.used.borrow_mut().push(fd.number());
        }
    }

    /// Mark every field handled: the message is kept whole (for example to echo it in `/config_dump`).
    pub fn mark_all(&self) {
        let mut used = self.used.borrow_mut();
        for (fd, _) in self.msg.fields() {
            used.push(fd.number());
        }
    }

    /// Whether the field is set (does not mark it).
    pub fn has(&self, name: &str) -> bool {
        self.fd(name).is_some_and(|fd| self.msg.has_field(&fd))
    }

    /// The field's value if set; marks it handled.
    fn value(&self, name: &str) -> Option<Cow<'_, Value>> {
        let fd = self.fd(name)?;
        self.used.borrow_mut().push(fd.number());
        if self.msg.has_field(&fd) {
            Some(self.msg.get_field(&fd))
        } else {
            None
        }
    }

    /// Refuse the field if it is set, with `why` (or "not supported by Remora").
    pub fn unsupported(&self, name: &str) {
        if self.value(name).is_some() {
            self.err(name, "not supported by Remora");
        }
    }

    pub fn string(&self, name: &str) -> Option<String> {
        match self.value(name)?.as_ref() {
            Value::String(s) => Some(s.clone()),
            _ => None,
        }
    }

    pub fn bytes(&self, name: &str) -> Option<Vec<u8>> {
        match self.value(name)?.as_ref() {
            Value::Bytes(b) => Some(b.to_vec()),
            _ => None,
        }
    }

    pub fn bool(&self, name: &str) -> bool {
        matches!(self.value(name).as_deref(), Some(Value::Bool(true)))
    }

    pub fn u32(&self, name: &str) -> u32 {
        match self.value(name).as_deref() {
            Some(Value::U32(v)) => *v,
            _ => 0,
        }
    }

    pub fn u64(&self, name: &str) -> u64 {
        match self.value(name).as_deref() {
            Some(Value::U64(v)) => *v,
            Some(Value::U32(v)) => u64::from(*v),
            _ => 0,
        }
    }

    pub fn i64(&self, name: &str) -> i64 {
        match self.value(name).as_deref() {
            Some(Value::I64(v)) => *v,
            Some(Value::I32(v)) => i64::from(*v),
            _ => 0,
        }
    }

    pub fn f64(&self, name: &str) -> f64 {
        match self.value(name).as_deref() {
            Some(Value::F64(v)) => *v,
            Some(Value::F32(v)) => f64::from(*v),
            _ => 0.0,
        }
    }

    /// The enum's value name (the default, number 0, when unset).
    pub fn enum_name(&self, name: &str) -> String {
        let Some(fd) = self.fd(name) else {
            return String::new();
        };
        self.used.borrow_mut().push(fd.number());
        let n = match self.msg.get_field(&fd).as_ref() {
            Value::EnumNumber(n) => *n,
            _ => 0,
        };
        match fd.kind().as_enum().and_then(|e| e.get_value(n)) {
            Some(v) => v.name().to_string(),
            None => n.to_string(),
        }
    }

    pub fn strings(&self, name: &str) -> Vec<String> {
        match self.value(name).as_deref() {
            Some(Value::List(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// A repeated `uint32` field.
    pub fn u32s(&self, name: &str) -> Vec<u32> {
        match self.value(name).as_deref() {
            Some(Value::List(items)) => items.iter().filter_map(Value::as_u32).collect(),
            _ => Vec::new(),
        }
    }

    /// A singular message field.
    pub fn msg(&self, name: &str) -> Option<Node<'_>> {
        let path = self.child_path(name);
        match self.value(name)? {
            Cow::Borrowed(Value::Message(m)) => Some(Node::root(m, path, self.errs)),
            Cow::Owned(Value::Message(m)) => Some(Node::owned(m, path, self.errs)),
            _ => None,
        }
    }

    /// A repeated message field.
    pub fn list(&self, name: &str) -> Vec<Node<'_>> {
        let path = self.child_path(name);
        match self.value(name) {
            Some(Cow::Borrowed(Value::List(items))) => items
                .iter()
                .enumerate()
                .filter_map(|(i, v)| match v {
                    Value::Message(m) => Some(Node::root(m, format!("{path}[{i}]"), self.errs)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// A map field with message values, sorted by key.
    pub fn map(&self, name: &str) -> Vec<(String, Node<'_>)> {
        let path = self.child_path(name);
        let mut out = match self.value(name) {
            Some(Cow::Borrowed(Value::Map(entries))) => entries
                .iter()
                .filter_map(|(k, v)| {
                    let key = match k {
                        MapKey::String(s) => s.clone(),
                        other => format!("{other:?}"),
                    };
                    match v {
                        Value::Message(m) => {
                            Some((key.clone(), Node::root(m, format!("{path}[{key:?}]"), self.errs)))
                        }
                        _ => None,
                    }
                })
                .collect(),
            _ => Vec::new(),
        };
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// A `google.protobuf.*Value` wrapper's value.
    fn wrapped(&self, name: &str) -> Option<Value> {
        match self.value(name)?.as_ref() {
            Value::Message(m) => Some(
                m.get_field_by_name("value")
                    .map(|v| v.into_owned())
                    .unwrap_or(Value::Bool(false)),
            ),
            _ => None,
        }
    }

    pub fn wrapped_u32(&self, name: &str) -> Option<u32> {
        match self.wrapped(name)? {
            Value::U32(v) => Some(v),
            _ => None,
        }
    }

    pub fn wrapped_u64(&self, name: &str) -> Option<u64> {
        match self.wrapped(name)? {
            Value::U64(v) => Some(v),
            Value::U32(v) => Some(u64::from(v)),
            _ => None,
        }
    }

    pub fn wrapped_bool(&self, name: &str) -> Option<bool> {
        match self.wrapped(name)? {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn wrapped_f64(&self, name: &str) -> Option<f64> {
        match self.wrapped(name)? {
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    /// A `google.protobuf.Duration` field; a negative one is an error.
    pub fn duration(&self, name: &str) -> Option<Duration> {
        let v = self.value(name)?;
        let Value::Message(m) = v.as_ref() else {
            return None;
        };
        let secs = m
            .get_field_by_name("seconds")
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        let nanos = m.get_field_by_name("nanos").and_then(|v| v.as_i32()).unwrap_or(0);
        if secs < 0 || nanos < 0 {
            self.err(name, "a negative duration is not allowed");
            return None;
        }
        Some(Duration::new(secs as u64, nanos as u32))
    }

    /// An `envoy.type.v3.Percent` field, as a fraction 0.0..=1.0.
    pub fn percent(&self, name: &str) -> Option<f64> {
        let n = self.msg(name)?;
        let v = n.f64("value");
        if !(0.0..=100.0).contains(&v) {
            n.err("value", format!("{v} is not a percentage (0 to 100)"));
        }
        Some(v.clamp(0.0, 100.0) / 100.0)
    }

    /// A `google.protobuf.Any` field, unpacked.
    pub fn any(&self, name: &str) -> Option<Node<'_>> {
        let path = self.child_path(name);
        let v = self.value(name)?;
        let Value::Message(any) = v.as_ref() else {
            return None;
        };
        unpack_any(any, path, self.errs)
    }

    /// This message as an `Any`, unpacked (for lists of Anys).
    pub fn unpack(&self) -> Option<Node<'a>> {
        self.mark_all();
        unpack_any(&self.msg, self.path.clone(), self.errs)
    }
}

fn unpack_any<'e>(any: &DynamicMessage, path: String, errs: &'e Errors) -> Option<Node<'e>> {
    let url = any
        .get_field_by_name("type_url")
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let bytes = match any.get_field_by_name("value").as_deref() {
        Some(Value::Bytes(b)) => b.clone(),
        _ => Default::default(),
    };
    let Some(desc) = descriptors::message_for_type_url(&url) else {
        errs.push(path, format!("unknown type {url:?}"));
        return None;
    };
    match DynamicMessage::decode(desc, bytes) {
        Ok(m) => Some(Node::owned(m, path, errs)),
        Err(e) => {
            errs.push(path, format!("{url}: {e}"));
            None
        }
    }
}

/// Encode a message (used when `/config_dump` echoes what was loaded).
pub fn encode(msg: &DynamicMessage) -> Vec<u8> {
    msg.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::{message_from_text, Format};

    #[test]
    fn unread_fields_are_refused_with_their_path() {
        let desc = descriptors::message("envoy.config.cluster.v3.Cluster").unwrap();
        let m = message_from_text(
            "{name: a, lb_policy: MAGLEV, connect_timeout: 1s}",
            Format::Yaml,
            &desc,
        )
        .unwrap();
        let errs = Errors::default();
        {
            let n = Node::root(&m, "clusters[0]", &errs);
            assert_eq!(n.string("name").as_deref(), Some("a"));
            assert_eq!(n.duration("connect_timeout"), Some(Duration::from_secs(1)));
        }
        let errs = errs.take();
        assert_eq!(errs.len(), 1);
        assert_eq!(
            errs[0].to_string(),
            "clusters[0].lb_policy: not supported by Remora"
        );
    }
}
