//! One runtime value as Envoy keeps it (`Runtime::Snapshot::Entry`): the raw string shown by `/runtime`, and
//! the typed readings taken when the layer is built (integer, double, boolean, fractional percent), so a read is
//! a map look-up and no parsing.
//!
//! How each source becomes an entry, as `source/common/runtime/runtime_impl.cc` does it:
//! - a `google.protobuf.Value` of a static or RTDS layer: a number sets the double, the integer (floored, when
//!   not negative) and, for an integral value below `INT_MAX`, the boolean (`!= 0`); its raw string is
//!   `absl::StrCat(double)` (six significant digits: `4294967295` shows as `4.29497e+09`). A bool sets the
//!   boolean (`"true"`/`"false"`). A struct holding `numerator`/`denominator` is a fractional percent. A string
//!   keeps its text and is read as a double when it parses as one.
//! - a disk file or an admin override: its text is read as YAML (`ValueUtil::loadFromYaml`) and then as above,
//!   keeping the text as the raw string.

use std::collections::BTreeMap;

/// `envoy.type.v3.FractionalPercent`: `numerator` out of `denominator` (100, 10 000 or 1 000 000).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fraction {
    pub numerator: u32,
    pub denominator: u32,
}

/// A runtime value; see the module docs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Entry {
    /// What `/runtime` shows.
    pub raw: String,
    pub uint: Option<u64>,
    pub double: Option<f64>,
    pub boolean: Option<bool>,
    pub fraction: Option<Fraction>,
}

/// A JSON-like value: what a `google.protobuf.Value` or a YAML scalar holds.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Number(f64),
    String(String),
    Bool(bool),
    Struct(BTreeMap<String, Value>),
    List,
}

impl Entry {
    /// An entry from a `Value`; `raw` (the text of a file or an admin override) replaces the derived raw string.
    pub fn from_value(v: &Value, raw: Option<&str>) -> Entry {
        let mut e = Entry {
            raw: raw.map(str::to_string).unwrap_or_default(),
            ..Default::default()
        };
        match v {
            Value::Number(n) => {
                set_number(&mut e, *n);
                if e.raw.is_empty() {
                    e.raw = six_digits(*n);
                }
            }
            Value::Bool(b) => {
                e.boolean = Some(*b);
                if e.raw.is_empty() {
                    e.raw = b.to_string();
                }
            }
            Value::Struct(fields) => {
                if e.raw.is_empty() {
                    e.raw = debug_struct(fields);
                }
                e.fraction = fraction(fields);
            }
            Value::String(s) => {
                if e.raw.is_empty() {
                    e.raw = s.clone();
                }
                if let Ok(d) = e.raw.trim().parse::<f64>() {
                    set_number(&mut e, d);
                }
            }
            Value::Null | Value::List => {}
        }
        e
    }

    /// An entry from text (a disk layer's file, an admin override), read as YAML the way Envoy loads it.
    pub fn from_text(text: &str) -> Entry {
        let v = match serde_yaml::from_str::<serde_yaml::Value>(text) {
            Ok(y) => from_yaml(&y),
            Err(_) => Value::String(text.to_string()),
        };
        Entry::from_value(&v, Some(text))
    }
}

fn from_yaml(y: &serde_yaml::Value) -> Value {
    use serde_yaml::Value as Y;
    match y {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(*b),
        Y::Number(n) => n.as_f64().map_or(Value::Null, Value::Number),
        Y::String(s) => Value::String(s.clone()),
        Y::Sequence(_) => Value::List,
        Y::Mapping(m) => Value::Struct(
            m.iter()
                .filter_map(|(k, v)| k.as_str().map(|k| (k.to_string(), from_yaml(v))))
                .collect(),
        ),
        Y::Tagged(t) => from_yaml(&t.value),
    }
}

/// Envoy's `setNumberValue`.
fn set_number(e: &mut Entry, v: f64) {
    e.double = Some(v);
    if v < f64::from(i32::MAX) && v == f64::from(v as i32) {
        e.boolean = Some(v != 0.0);
    }
    if v >= 0.0 && v <= u64::MAX as f64 {
        e.uint = Some(v as u64);
    }
}

/// Envoy's `parseFractionValue`: `numerator` (a number) and `denominator` (`HUNDRED`, `TEN_THOUSAND`,
/// `MILLION`; default `HUNDRED`); any other field makes it no fraction.
fn fraction(fields: &BTreeMap<String, Value>) -> Option<Fraction> {
    let mut f = Fraction {
        numerator: 0,
        denominator: 100,
    };
    for (k, v) in fields {
        match (k.as_str(), v) {
            ("numerator", Value::Number(n)) => f.numerator = *n as u32,
            ("numerator", _) => {}
            ("denominator", Value::String(d)) => {
                f.denominator = match d.as_str() {
                    "HUNDRED" => 100,
                    "TEN_THOUSAND" => 10_000,
                    "MILLION" => 1_000_000,
                    _ => return None,
                }
            }
            _ => return None,
        }
    }
    Some(f)
}

/// The protobuf text form of a struct (`Struct::DebugString`), which Envoy shows as a struct's raw value.
fn debug_struct(fields: &BTreeMap<String, Value>) -> String {
    fn value(v: &Value) -> String {
        match v {
            Value::Null => "null_value: NULL_VALUE".into(),
            Value::Number(n) => format!("number_value: {}", six_digits(*n)),
            Value::String(s) => format!("string_value: {s:?}"),
            Value::Bool(b) => format!("bool_value: {b}"),
            Value::Struct(f) => format!("struct_value {{ {} }}", debug_struct(f).trim_end()),
            Value::List => "list_value { }".into(),
        }
    }
    let mut out = String::new();
    for (k, v) in fields {
        out.push_str(&format!("fields {{ key: {k:?} value {{ {} }} }}\n", value(v)));
    }
    out
}

/// `absl::StrCat(double)`: `%g` with six significant digits (`10000`, `0.5`, `4.29497e+09`, `1e+06`).
pub fn six_digits(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if !v.is_finite() {
        return if v.is_nan() {
            "nan".into()
        } else if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    let sci = format!("{v:.5e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..6).contains(&exp) {
        let m = trim_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{m}e{sign}{:02}", exp.abs())
    } else {
        let decimals = (5 - exp).max(0) as usize;
        trim_zeros(&format!("{v:.decimals$}")).to_string()
    }
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_show_as_absl_strcat_does() {
        assert_eq!(six_digits(10000.0), "10000");
        assert_eq!(six_digits(50000.0), "50000");
        assert_eq!(six_digits(4294967295.0), "4.29497e+09");
        assert_eq!(six_digits(1_000_000.0), "1e+06");
        assert_eq!(six_digits(0.5), "0.5");
        assert_eq!(six_digits(0.0001), "0.0001");
        assert_eq!(six_digits(0.00001), "1e-05");
        assert_eq!(six_digits(-3.25), "-3.25");
        assert_eq!(six_digits(123456.0), "123456");
        assert_eq!(six_digits(1234567.0), "1.23457e+06");
    }

    #[test]
    fn a_number_reads_as_integer_double_and_boolean() {
        let e = Entry::from_value(&Value::Number(5.0), None);
        assert_eq!(
            (e.raw.as_str(), e.uint, e.double, e.boolean),
            ("5", Some(5), Some(5.0), Some(true))
        );
        let e = Entry::from_value(&Value::Number(3.7), None);
        assert_eq!((e.uint, e.boolean), (Some(3), None));
        let e = Entry::from_value(&Value::Number(-1.0), None);
        assert_eq!((e.uint, e.boolean), (None, Some(true)));
        let e = Entry::from_value(&Value::Number(0.0), None);
        assert_eq!(e.boolean, Some(false));
    }

    #[test]
    fn strings_bools_and_fractions() {
        let e = Entry::from_value(&Value::String("32768".into()), None);
        assert_eq!((e.raw.as_str(), e.uint), ("32768", Some(32768)));
        let e = Entry::from_value(&Value::String("abc".into()), None);
        assert_eq!((e.raw.as_str(), e.uint, e.boolean), ("abc", None, None));
        let e = Entry::from_value(&Value::Bool(false), None);
        assert_eq!((e.raw.as_str(), e.boolean, e.uint), ("false", Some(false), None));
        let f: BTreeMap<String, Value> = [
            ("numerator".to_string(), Value::Number(5.0)),
            ("denominator".to_string(), Value::String("TEN_THOUSAND".into())),
        ]
        .into();
        let e = Entry::from_value(&Value::Struct(f), None);
        assert_eq!(
            e.fraction,
            Some(Fraction {
                numerator: 5,
                denominator: 10_000
            })
        );
    }

    #[test]
    fn text_is_read_as_yaml_and_kept_raw() {
        let e = Entry::from_text("7");
        assert_eq!((e.raw.as_str(), e.uint), ("7", Some(7)));
        let e = Entry::from_text("true");
        assert_eq!((e.raw.as_str(), e.boolean), ("true", Some(true)));
        let e = Entry::from_text("{numerator: 20}");
        assert_eq!(
            e.fraction,
            Some(Fraction {
                numerator: 20,
                denominator: 100
            })
        );
        let e = Entry::from_text("hello: [");
        assert_eq!((e.raw.as_str(), e.uint), ("hello: [", None));
    }
}
