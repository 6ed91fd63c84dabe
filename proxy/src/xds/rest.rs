//! REST polling: a config source (`cds_config`, `lds_config`, an EDS cluster's `eds_config` or a connection
//! manager's `rds.config_source`) whose `api_config_source` has `api_type: REST`, as Envoy's HTTP subscription
//! does it (`xds_protocol.rst`, "REST-JSON polling subscriptions"). One poller per config source and type,
//! shared by every cluster or connection manager that names it.
//!
//! Every `refresh_delay` (default 1 s) a `DiscoveryRequest` in JSON is POSTed to `/v3/discovery:clusters`
//! (`:listeners`, `:endpoints`, `:routes`; the last two with the `resource_names` of interest) on a host of the
//! static cluster `cluster_names[0]` (its hosts in turn, HTTP/1.1, over TLS when the cluster has a TLS transport
//! socket: see [`super::dial`]), and the answer must come within `request_timeout` (default 1 s). A 200 carries a
//! `DiscoveryResponse` in JSON, applied as a state-of-the-world update; a 304 means nothing changed. REST has no
//! nonce: the next request carries the last accepted `version_info`, and after a rejected response its
//! `error_detail` (the NACK). A failed poll counts `update_failure` and keeps the last good config.

use super::manager::Removal;
use super::{decode_resources, Source, CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE};
use crate::config::descriptors;
use crate::config::error::ConfigErrors;
use crate::config::load::{self, Format};
use crate::server::Shared;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use prost_reflect::{DynamicMessage, SerializeOptions, Value};
use std::sync::Arc;
use std::time::Duration;

/// A lowered REST `ApiConfigSource`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RestConfig {
    /// `cluster_names[0]`: a static cluster that reaches the management server.
    pub cluster_name: String,
    /// `refresh_delay` (default 1 s).
    pub refresh_delay: Duration,
    /// `request_timeout` (default 1 s).
    pub request_timeout: Duration,
}

/// How one poll ended.
pub(crate) enum Poll {
    /// 200: the response to apply, or why it does not parse.
    Response(Result<DynamicMessage, ConfigErrors>),
    /// 304: nothing changed.
    Unchanged,
}

/// Poll for `type_url` for as long as the process lives. For CDS and LDS the first poll (whatever its
/// outcome) ends the initial fetch. EDS and RDS ask for the names whose config source is this one
/// (`resource_names`), and do not poll while there are none.
pub async fn run(shared: Arc<Shared>, cfg: RestConfig, type_url: &'static str) {
    let path = match type_url {
        CLUSTER_TYPE => "/v3/discovery:clusters",
        LISTENER_TYPE => "/v3/discovery:listeners",
        ENDPOINT_TYPE => "/v3/discovery:endpoints",
        _ => "/v3/discovery:routes",
    };
    let wildcard = type_url == CLUSTER_TYPE || type_url == LISTENER_TYPE;
    let source = Source::Rest(cfg.clone());
    let mut version = String::new();
    let mut rejected: Option<ConfigErrors> = None;
    let mut attempt = 0usize;
    let mut first = true;
    loop {
        let stats = match type_url {
            CLUSTER_TYPE => Some(&shared.dynamic.cds),
            LISTENER_TYPE => Some(&shared.dynamic.lds),
            _ => None,
        };
        let names = if wildcard {
            Vec::new()
        } else {
            super::ads::interest(&shared, type_url, &source)
        };
        if !wildcard && names.is_empty() {
            tokio::time::sleep(cfg.refresh_delay).await;
            continue;
        }
        let outcome = match request_body(&shared, type_url, &version, &names, rejected.as_ref()) {
            Ok(body) => poll(&shared, &cfg, path, body, attempt).await,
            Err(e) => Err(e),
        };
        attempt += 1;
        match outcome {
            Ok(Poll::Unchanged) => {}
            Ok(Poll::Response(parsed)) => {
                let v = parsed
                    .as_ref()
                    .ok()
                    .and_then(|r| r.get_field_by_name("version_info"))
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                let result = match parsed.and_then(|resp| decode_resources(&resp, type_url)) {
                    Ok(mut resources) => {
                        for r in &mut resources {
                            r.version = v.clone();
                        }
                        let removal = if wildcard {
                            Removal::Omitted
                        } else {
                            Removal::Names(Vec::new())
                        };
                        super::ads::apply(&shared, type_url, &resources, &removal, &v)
                    }
                    Err(e) => {
                        // Not even decoded: the managers never saw it.
                        if let Some(stats) = stats {
                            stats.update_attempt.inc();
                            stats.update_rejected.inc();
                        }
                        Err(e)
                    }
                };
                match result {
                    Ok(()) => {
                        tracing::debug!(type_url, version = %v, "xDS REST: applied");
                        version = v;
                        rejected = None;
                    }
                    Err(e) => {
                        tracing::warn!(type_url, rejected = %v, errors = %e, "xDS REST: rejected");
                        if type_url == super::ENDPOINT_TYPE {
                            shared
                                .dynamic
                                .eds_update_rejected(&shared, &Source::Rest(cfg.clone()));
                        }
                        rejected = Some(e);
                    }
                }
            }
            Err(e) => {
                match stats {
                    Some(stats) => {
                        stats.update_attempt.inc();
                        stats.update_failure.inc();
                    }
                    None => shared.dynamic.count_failure(type_url, &names),
                }
                tracing::warn!(type_url, error = %e, "xDS REST: poll failed; keeping the last good config");
            }
        }
        if first && wildcard {
            first = false;
            // `apply` marked a decoded round done; a failed or undecodable one ends the initial fetch too.
            shared.dynamic.initial_done(type_url == CLUSTER_TYPE);
        }
        tokio::time::sleep(cfg.refresh_delay).await;
    }
}

/// The `DiscoveryRequest` of one poll, as JSON.
pub(crate) fn request_body(
    shared: &Shared,
    type_url: &str,
    version: &str,
    names: &[String],
    rejected: Option<&ConfigErrors>,
) -> Result<Vec<u8>, String> {
    let desc = descriptors::message("envoy.service.discovery.v3.DiscoveryRequest")
        .ok_or("no descriptor for DiscoveryRequest")?;
    let mut m = DynamicMessage::new(desc);
    m.set_field_by_name("version_info", Value::String(version.to_string()));
    m.set_field_by_name("type_url", Value::String(type_url.to_string()));
    if !names.is_empty() {
        m.set_field_by_name(
            "resource_names",
            Value::List(names.iter().map(|n| Value::String(n.clone())).collect()),
        );
    }
    if let Some(n) = super::ads::node(shared) {
        m.set_field_by_name("node", Value::Message(n));
    }
    if let Some(e) = rejected {
        let detail = super::ads::error_detail(e).map_err(|s| s.message().to_string())?;
        m.set_field_by_name("error_detail", Value::Message(detail));
    }
    let mut ser = serde_json::Serializer::new(Vec::new());
    m.serialize_with_options(&mut ser, &SerializeOptions::new().use_proto_field_name(true))
        .map_err(|e| e.to_string())?;
    Ok(ser.into_inner())
}

/// POST `body` (a `DiscoveryRequest`) to `path` on a host of the control plane's cluster.
pub(crate) async fn poll(
    shared: &Shared,
    cfg: &RestConfig,
    path: &str,
    body: Vec<u8>,
    attempt: usize,
) -> Result<Poll, String> {
    let (cluster, host) = super::dial::pick(shared, &cfg.cluster_name, attempt)?;
    let addr = host.address;
    let exchange = async {
        let stream = super::dial::connect(&cluster, &host).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        tokio::spawn(conn);
        let req = http::Request::post(path)
            .header(http::header::HOST, addr.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| format!("{addr}: {e}"))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{addr}: {e}"))?
            .to_bytes();
        Ok::<_, String>((status, bytes))
    };
    let (status, bytes) = tokio::time::timeout(cfg.request_timeout, exchange)
        .await
        .map_err(|_| format!("no answer from {addr} within {:?}", cfg.request_timeout))??;
    match status.as_u16() {
        304 => Ok(Poll::Unchanged),
        200 => {
            let desc = descriptors::message("envoy.service.discovery.v3.DiscoveryResponse")
                .ok_or("no descriptor for DiscoveryResponse")?;
            let text = String::from_utf8_lossy(&bytes);
            Ok(Poll::Response(load::message_from_text(
                &text,
                Format::Json,
                &desc,
            )))
        }
        other => Err(format!("{addr} answered {other}")),
    }
}
