//! Envoy's command line, for the flags Remora implements.

use std::fmt;

/// `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Serve,
    Validate,
}

/// The parsed command line.
#[derive(Clone, Debug)]
pub struct Options {
    pub config_path: Option<String>,
    pub config_yaml: Option<String>,
    pub mode: Mode,
    pub service_cluster: Option<String>,
    pub service_node: Option<String>,
    pub service_zone: Option<String>,
    pub log_level: String,
    pub component_log_level: String,
    pub log_path: Option<String>,
    pub concurrency: usize,
    pub drain_time_s: u64,
    pub parent_shutdown_time_s: u64,
    pub drain_strategy: String,
    pub base_id: u64,
    pub use_dynamic_base_id: bool,
    pub admin_address_path: Option<String>,
    pub command_line: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            config_path: None,
            config_yaml: None,
            mode: Mode::Serve,
            service_cluster: None,
            service_node: None,
            service_zone: None,
            log_level: "info".into(),
            component_log_level: String::new(),
            log_path: None,
            concurrency: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            drain_time_s: 600,
            parent_shutdown_time_s: 900,
            drain_strategy: "gradual".into(),
            base_id: 0,
            use_dynamic_base_id: false,
            admin_address_path: None,
            command_line: Vec::new(),
        }
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(Box<Options>),
    Help,
    Version,
}

#[derive(Debug, PartialEq, Eq)]
pub struct CliError(pub String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error: {}", self.0)
    }
}

pub const LOG_LEVELS: [&str; 8] = [
    "trace", "debug", "info", "warning", "warn", "error", "critical", "off",
];

pub const HELP: &str = "\
USAGE: remora [options]

Remora: an Envoy-compatible sidecar proxy. Takes Envoy's command line.

  -c, --config-path <path>        Envoy bootstrap (YAML or JSON). Without -c or --config-yaml, the embedded
                                  default (the local development proxy) runs.
  --config-yaml <yaml>            Inline YAML merged over --config-path (protobuf MergeFrom).
  --mode <serve|validate>         validate: check the configuration, report every error, bind nothing.
  --service-cluster <name>        Sets node.cluster.
  --service-node <name>           Sets node.id.
  --service-zone <zone>           Sets node.locality.zone.
  -l, --log-level <level>         trace, debug, info, warning|warn, error, critical, off. Default info.
  --component-log-level <spec>    Accepted for compatibility; component levels follow --log-level.
  --log-path <path>               Write logs to this file instead of stderr.
  --concurrency <n>               Worker threads (default: the number of cores).
  --drain-time-s <s>              How long in-flight requests may take to finish on shutdown (default 600).
  --parent-shutdown-time-s <s>    Accepted for compatibility (hot restart is not implemented).
  --drain-strategy <gradual|immediate>
  --admin-address-path <path>     Write the admin's bound address here once it listens.
  --base-id <n>, --use-dynamic-base-id
                                  Accepted for compatibility: no-ops (no hot restart).
  --version                       Print the version.
  -h, --help                      Print this help.

Subcommands (Remora's own):
  remora template SERVICE.yaml    Render a sidecar bootstrap from a service manifest (config/templates/).
  remora inject [FILE|-] [--canary N] [--init-iptables] ...
                                  Add the sidecar to Kubernetes Deployments (remora inject --help).
";

/// Parse the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, CliError> {
    let mut o = Options {
        command_line: args.to_vec(),
        ..Options::default()
    };
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, CliError> {
            if let Some(v) = inline.clone() {
                return Ok(v);
            }
            i += 1;
            args.get(i)
                .cloned()
                .ok_or_else(|| CliError(format!("missing value for {name}")))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--version" => return Ok(Command::Version),
            "-c" | "--config-path" => o.config_path = Some(value(&flag)?),
            "--config-yaml" => o.config_yaml = Some(value(&flag)?),
            "--mode" => {
                o.mode = match value(&flag)?.as_str() {
                    "serve" => Mode::Serve,
                    "validate" => Mode::Validate,
                    other => return Err(CliError(format!("unknown mode '{other}'"))),
                }
            }
            "--service-cluster" => o.service_cluster = Some(value(&flag)?),
            "--service-node" => o.service_node = Some(value(&flag)?),
            "--service-zone" => o.service_zone = Some(value(&flag)?),
            "-l" | "--log-level" => {
                let l = value(&flag)?;
                if !LOG_LEVELS.contains(&l.as_str()) {
                    return Err(CliError(format!("invalid log level specified '{l}'")));
                }
                o.log_level = l;
            }
            "--component-log-level" => o.component_log_level = value(&flag)?,
            "--log-path" => o.log_path = Some(value(&flag)?),
            "--concurrency" => {
                let v = value(&flag)?;
                let n: usize = v
                    .parse()
                    .map_err(|_| CliError(format!("--concurrency: '{v}' is not a number")))?;
                o.concurrency = n.max(1);
            }
            "--drain-time-s" => o.drain_time_s = number(&flag, &value(&flag)?)?,
            "--parent-shutdown-time-s" => o.parent_shutdown_time_s = number(&flag, &value(&flag)?)?,
            "--drain-strategy" => {
                let v = value(&flag)?;
                if v != "gradual" && v != "immediate" {
                    return Err(CliError(format!("unknown drain-strategy '{v}'")));
                }
                o.drain_strategy = v;
            }
            "--base-id" => o.base_id = number(&flag, &value(&flag)?)?,
            "--use-dynamic-base-id" => o.use_dynamic_base_id = true,
            "--admin-address-path" => o.admin_address_path = Some(value(&flag)?),
            other => return Err(CliError(format!("unknown argument '{other}' (see --help)"))),
        }
        i += 1;
    }
    Ok(Command::Run(Box::new(o)))
}

fn number(flag: &str, v: &str) -> Result<u64, CliError> {
    v.parse()
        .map_err(|_| CliError(format!("{flag}: '{v}' is not a number")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn envoy_flags() {
        let Command::Run(o) = parse(&args(&[
            "-c",
            "a.yaml",
            "--config-yaml",
            "node: {id: x}",
            "--mode",
            "validate",
            "--service-zone=z1",
            "-l",
            "debug",
            "--concurrency",
            "2",
            "--drain-time-s",
            "3",
            "--base-id",
            "1",
            "--use-dynamic-base-id",
        ]))
        .unwrap() else {
            panic!()
        };
        assert_eq!(o.config_path.as_deref(), Some("a.yaml"));
        assert_eq!(o.config_yaml.as_deref(), Some("node: {id: x}"));
        assert_eq!(o.mode, Mode::Validate);
        assert_eq!(o.service_zone.as_deref(), Some("z1"));
        assert_eq!(o.log_level, "debug");
        assert_eq!(o.concurrency, 2);
        assert_eq!(o.drain_time_s, 3);
    }

    #[test]
    fn errors_are_envoys() {
        assert_eq!(parse(&args(&["--mode", "x"])).unwrap_err().0, "unknown mode 'x'");
        assert_eq!(
            parse(&args(&["-l", "loud"])).unwrap_err().0,
            "invalid log level specified 'loud'"
        );
        assert!(parse(&args(&["--bogus"])).is_err());
        assert!(parse(&args(&["-c"])).is_err());
        assert!(matches!(parse(&args(&["--version"])).unwrap(), Command::Version));
    }
}
